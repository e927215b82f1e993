"""The segmenter's combined loss on hand-made logits and targets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, LovaszLoss

from weakseg.losses.constraints import multiple_instance_loss, size_constraint_loss
from weakseg.losses.segmentation import IGNORE_INDEX, SegmentationLoss, SegmentationLossWeights, label_region

SIZE = 8


def _square_mask(batch: int, positive: list[bool]) -> torch.Tensor:
    masks = torch.zeros(batch, 1, SIZE, SIZE)
    for index, is_positive in enumerate(positive):
        if is_positive:
            masks[index, 0, 2:6, 2:6] = 1.0
    return masks


def test_perfect_prediction_has_near_zero_mask_loss() -> None:
    masks = _square_mask(2, [True, False])
    logits = (masks * 2.0 - 1.0) * 20.0  # confident and right everywhere
    loss = SegmentationLoss(SegmentationLossWeights(dice=1.0, lovasz=0.5, classification=0.0))
    terms = loss.terms(logits, torch.zeros(2, 1), masks, torch.tensor([1.0, 0.0]))
    assert float(terms.dice) < 1e-6
    assert float(terms.lovasz) == pytest.approx(0.0, abs=1e-6)
    assert float(terms.total) < 1e-6


def test_total_is_the_weighted_sum_of_smp_terms() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, SIZE, SIZE, generator=generator)
    label_logits = torch.randn(3, 1, generator=generator)
    masks = _square_mask(3, [True, True, False])
    labels = torch.tensor([1.0, 1.0, 0.0])
    weights = SegmentationLossWeights(dice=1.0, lovasz=0.5, classification=0.2)
    terms = SegmentationLoss(weights).terms(logits, label_logits, masks, labels)
    expected_bce = F.binary_cross_entropy_with_logits(label_logits.reshape(-1), labels)
    assert float(terms.classification) == pytest.approx(float(expected_bce), rel=1e-6)
    # Batch-pooled soft Dice computed by hand: the negative tile's probabilities are in the denominator.
    probabilities = torch.sigmoid(logits)
    intersection = (probabilities * masks).sum()
    expected_dice = 1 - 2 * intersection / (probabilities.sum() + masks.sum())
    assert float(terms.dice) == pytest.approx(float(expected_dice), rel=1e-5)
    assert float(terms.total) == pytest.approx(
        float(terms.dice + 0.5 * terms.lovasz + 0.2 * terms.classification), rel=1e-6
    )


def test_all_negative_batch_has_finite_loss_pushing_towards_background() -> None:
    masks = torch.zeros(4, 1, SIZE, SIZE)
    logits = torch.full((4, 1, SIZE, SIZE), 0.5, requires_grad=True)  # mild false positives everywhere
    loss = SegmentationLoss(SegmentationLossWeights(dice=1.0, lovasz=0.0, classification=0.0))
    terms = loss.terms(logits, torch.zeros(4, 1), masks, torch.zeros(4))
    assert math.isfinite(float(terms.total.detach()))
    assert float(terms.dice.detach()) > 0.1
    # Why the background Dice is needed: smp's foreground Dice is exactly 0 on an empty batch.
    assert float(DiceLoss(mode="binary", from_logits=True)(logits, masks).detach()) == 0.0
    terms.total.backward()
    assert logits.grad is not None
    # Every pixel is pushed down (gradient descent lowers a logit whose gradient is positive).
    assert bool((logits.grad > 0).all())


def test_all_negative_dice_term_shrinks_as_predictions_empty() -> None:
    masks = torch.zeros(2, 1, SIZE, SIZE)
    loss = SegmentationLoss(SegmentationLossWeights(dice=1.0, lovasz=0.0, classification=0.0))
    values = [
        float(loss(torch.full((2, 1, SIZE, SIZE), level), torch.zeros(2, 1), masks, torch.zeros(2)))
        for level in (2.0, 0.0, -2.0, -10.0)
    ]
    assert values == sorted(values, reverse=True)
    assert values[-1] < 1e-3


def test_negative_tile_in_mixed_batch_gets_gradient() -> None:
    masks = _square_mask(2, [True, False])
    logits = torch.zeros(2, 1, SIZE, SIZE, requires_grad=True)
    loss = SegmentationLoss(SegmentationLossWeights(dice=1.0, lovasz=0.5, classification=0.0))
    loss(logits, torch.zeros(2, 1), masks, torch.tensor([1.0, 0.0])).backward()
    assert logits.grad is not None
    assert float(logits.grad[1].abs().sum()) > 0.0
    assert bool((logits.grad[1] >= 0).all())  # the negative tile only ever gets pushed to background


def test_classification_weight_scales_gradient_of_head() -> None:
    masks = _square_mask(2, [True, False])
    logits = torch.zeros(2, 1, SIZE, SIZE)
    label_logits = torch.zeros(2, 1, requires_grad=True)
    loss = SegmentationLoss(SegmentationLossWeights(dice=1.0, lovasz=0.5, classification=0.2))
    loss(logits, label_logits, masks, torch.tensor([1.0, 0.0])).backward()
    assert label_logits.grad is not None
    # d/dz of 0.2 * mean BCE at z=0 is 0.2 * (0.5 - y) / 2.
    assert label_logits.grad.reshape(-1).tolist() == pytest.approx([-0.05, 0.05], abs=1e-7)


# ------------------------------------------------------------------------------- ignored pixels (255)
def _with_band(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Marks a band of each tile's background as ignored (255); returns the targets and the kept pixels."""
    targets = masks.clone()
    band = torch.zeros_like(masks, dtype=torch.bool)
    band[:, :, 6:, :] = True
    targets[band] = 255.0
    return targets, ~band


def _plain_terms(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Today's mask terms: smp without ignore_index, background Dice for a batch without foreground."""
    dice_loss = DiceLoss(mode="binary", from_logits=True)
    lovasz_loss = LovaszLoss(mode="binary", per_image=False, from_logits=True)
    if bool((masks > 0.5).any()):
        dice = dice_loss(logits, masks)
    else:
        dice = dice_loss(-logits, 1.0 - masks)
    return dice, lovasz_loss(logits, masks)


@pytest.mark.parametrize("positive", [[True, False, True], [False, False, False]])
def test_ignored_pixels_are_left_out_and_nothing_changes_without_them(positive: list[bool]) -> None:
    """With a band of 255: each mask term equals the same smp loss on the kept pixels alone (background Dice
    when no kept pixel is foreground), and the band gets no gradient. Without one: bit-identical to today."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 1, SIZE, SIZE, generator=generator)
    masks = _square_mask(3, positive)
    loss = SegmentationLoss(SegmentationLossWeights(dice=1.0, lovasz=0.5, classification=0.0))

    plain_logits = logits.clone().requires_grad_(True)
    terms = loss.terms(plain_logits, torch.zeros(3, 1), masks, torch.zeros(3))
    terms.total.backward()
    reference_logits = logits.clone().requires_grad_(True)
    dice, lovasz = _plain_terms(reference_logits, masks)
    (dice + 0.5 * lovasz).backward()
    assert torch.equal(terms.dice, dice) and torch.equal(terms.lovasz, lovasz)
    assert plain_logits.grad is not None and reference_logits.grad is not None
    assert torch.equal(plain_logits.grad, reference_logits.grad)

    targets, kept = _with_band(masks)
    banded_logits = logits.clone().requires_grad_(True)
    terms = loss.terms(banded_logits, torch.zeros(3, 1), targets, torch.zeros(3))
    terms.total.backward()
    # The kept pixels alone, as one flat "image" (both terms pool over the batch).
    kept_logits = logits[kept].reshape(1, 1, -1, 1)
    kept_masks = masks[kept].reshape(1, 1, -1, 1)
    expected_dice, expected_lovasz = _plain_terms(kept_logits, kept_masks)
    assert float(terms.dice.detach()) == pytest.approx(float(expected_dice), rel=1e-6)
    assert float(terms.lovasz.detach()) == pytest.approx(float(expected_lovasz), rel=1e-6)
    assert float(terms.dice.detach()) > 0.0
    assert banded_logits.grad is not None
    assert float(banded_logits.grad[~kept].abs().sum()) == 0.0
    assert float(banded_logits.grad[kept].abs().sum()) > 0.0


def test_a_batch_whose_only_foreground_label_is_ignored_uses_the_background_dice() -> None:
    """255 is not foreground: a batch of background and ignored pixels takes the background Dice
    ``sum(p) / (2 N - sum(p))`` over its N kept pixels."""
    targets, kept = _with_band(torch.zeros(2, 1, SIZE, SIZE))
    logits = torch.full((2, 1, SIZE, SIZE), 0.5)
    logits[~kept] = 5.0  # confident "lesion" on the band, which must not count
    terms = SegmentationLoss(SegmentationLossWeights(dice=1.0, lovasz=0.0, classification=0.0)).terms(
        logits, torch.zeros(2, 1), targets, torch.zeros(2)
    )
    probabilities = torch.sigmoid(logits[kept])
    expected = probabilities.sum() / (2 * probabilities.numel() - probabilities.sum())
    assert float(terms.dice) == pytest.approx(float(expected), rel=1e-6)


def test_label_region_is_the_not_background_pixels_of_positives_and_everything_of_negatives() -> None:
    targets = torch.tensor([[[1, 0], [IGNORE_INDEX, 0]], [[0, 0], [0, 0]]], dtype=torch.float32)
    region = label_region(targets, torch.tensor([1.0, 0.0]))
    assert region.tolist() == [[[True, False], [True, False]], [[True, True], [True, True]]]


def test_tile_label_terms_add_their_weighted_values_and_default_to_nothing() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, SIZE, SIZE, generator=generator)
    masks = torch.zeros(2, 1, SIZE, SIZE)
    masks[0, 0, 1:7, 1:7] = IGNORE_INDEX  # a positive tile whose tissue is all ignored
    masks[0, 0, 3:5, 3:5] = 1.0
    labels = torch.tensor([1.0, 0.0])
    label_logits = torch.zeros(2, 1)
    plain = SegmentationLoss(SegmentationLossWeights()).terms(logits, label_logits, masks, labels)
    assert plain.multiple_instance.item() == 0.0 and plain.size.item() == 0.0
    weights = SegmentationLossWeights(
        multiple_instance=0.7, multiple_instance_top_fraction=0.25, size=2.0, size_lower=0.6, size_upper=0.9
    )
    terms = SegmentationLoss(weights).terms(logits, label_logits, masks, labels)
    region = label_region(masks, labels)
    expected_mil = multiple_instance_loss(logits, region, labels, 0.25)
    expected_size = size_constraint_loss(logits, region, labels, 0.6, 0.9)
    assert expected_size.item() > 0  # random logits give a size near 0.5, under the lower bound
    assert torch.isclose(terms.multiple_instance, expected_mil)
    assert torch.isclose(terms.size, expected_size)
    assert torch.isclose(terms.total, plain.total + 0.7 * expected_mil + 2.0 * expected_size)
