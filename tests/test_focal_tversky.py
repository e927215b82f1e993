"""Focal Tversky loss against hand-computed values and smp's TverskyLoss, its asymmetry, and its gradients."""

from __future__ import annotations

import pytest
import torch
from segmentation_models_pytorch.losses import TverskyLoss

from weakseg.losses.focal_tversky import FocalTverskyLoss, focal_tversky_loss, tversky_index

PROBABILITIES = torch.tensor([0.9, 0.2, 0.7, 0.1])
TARGETS = torch.tensor([1.0, 0.0, 0.0, 1.0])
# By hand: TP = 0.9 + 0.1 = 1.0, FN = 0.1 + 0.9 = 1.0, FP = 0.2 + 0.7 = 0.9.


def test_tversky_index_matches_hand_computation_without_smoothing() -> None:
    # TI = 1.0 / (1.0 + 0.7 * 1.0 + 0.3 * 0.9) = 1 / 1.97
    index = tversky_index(PROBABILITIES, TARGETS, alpha=0.7, beta=0.3, smooth=0.0)
    assert index.item() == pytest.approx(0.5076142132, abs=1e-6)


def test_focal_tversky_matches_hand_computation() -> None:
    # (1 - 1/1.97) ** (1/1.33) = 0.4923857868 ** 0.7518796992 = 0.5870171
    loss = focal_tversky_loss(PROBABILITIES, TARGETS, alpha=0.7, beta=0.3, gamma=1.33, smooth=0.0)
    assert loss.item() == pytest.approx(0.5870171, abs=1e-5)


def test_focal_tversky_with_default_smoothing_of_one() -> None:
    # TI = (1.0 + 1) / (1.97 + 1) = 0.6734006734; (1 - TI) ** (1/1.33) = 0.3265993266 ** 0.7518796992 = 0.4311198
    loss = focal_tversky_loss(PROBABILITIES, TARGETS, alpha=0.7, beta=0.3, gamma=1.33)
    assert loss.item() == pytest.approx(0.4311198, abs=1e-5)


def test_gamma_one_and_equal_weights_is_soft_dice_loss() -> None:
    loss = focal_tversky_loss(PROBABILITIES, TARGETS, alpha=0.5, beta=0.5, gamma=1.0, smooth=0.0)
    dice = 2 * 1.0 / (2 * 1.0 + 1.0 + 0.9)
    assert loss.item() == pytest.approx(1.0 - dice, abs=1e-6)


def test_false_negatives_cost_more_than_false_positives_with_alpha_above_beta() -> None:
    targets = torch.tensor([1.0, 1.0, 0.0, 0.0])
    missed_positive = torch.tensor([0.2, 1.0, 0.0, 0.0])  # one positive mostly missed (FN = 0.8)
    false_alarm = torch.tensor([1.0, 1.0, 0.8, 0.0])  # one negative mostly called positive (FP = 0.8)
    loss_fn = focal_tversky_loss(missed_positive, targets, 0.7, 0.3, 1.33, smooth=0.0)
    loss_fp = focal_tversky_loss(false_alarm, targets, 0.7, 0.3, 1.33, smooth=0.0)
    assert loss_fn.item() > loss_fp.item()


def test_perfect_and_worst_predictions() -> None:
    targets = torch.tensor([1.0, 0.0, 1.0])
    assert focal_tversky_loss(targets.clone(), targets, smooth=0.0).item() < 1e-4
    assert focal_tversky_loss(1.0 - targets, targets, smooth=0.0).item() == pytest.approx(1.0, abs=1e-6)


def test_batch_without_positive_tiles_is_defined_and_penalises_false_positives() -> None:
    targets = torch.zeros(4)
    assert focal_tversky_loss(torch.zeros(4), targets).item() < 1e-4
    assert focal_tversky_loss(torch.full((4,), 0.9), targets).item() > 0.5


def test_module_applies_sigmoid_to_logits_and_has_finite_gradients_when_saturated() -> None:
    loss_function = FocalTverskyLoss(0.7, 0.3, 1.33, smooth=0.0)
    logits = torch.logit(PROBABILITIES)
    assert loss_function(logits, TARGETS).item() == pytest.approx(0.5870171, abs=1e-5)
    saturated = torch.tensor([40.0, -40.0, 40.0], requires_grad=True)  # sigmoid is exactly 0/1 in float32
    loss = loss_function(saturated, torch.tensor([1.0, 0.0, 1.0]))
    loss.backward()
    assert saturated.grad is not None
    assert torch.isfinite(saturated.grad).all()


def test_gradient_pushes_probabilities_towards_targets() -> None:
    logits = torch.zeros(4, requires_grad=True)
    FocalTverskyLoss()(logits, TARGETS).backward()
    gradient = logits.grad
    assert gradient is not None
    assert (gradient[TARGETS == 1] < 0).all() and (gradient[TARGETS == 0] > 0).all()


def _smp_equivalent(alpha: float, beta: float, gamma: float, smooth: float) -> TverskyLoss:
    """smp's TverskyLoss with weakseg's parameters mapped (see the module docstring)."""
    return TverskyLoss(mode="binary", from_logits=True, alpha=beta, beta=alpha, gamma=1.0 / gamma, smooth=smooth)


# (alpha, beta, gamma, smooth): the paper's values with and without smoothing, the soft Dice loss, and an
# asymmetric setting with gamma < 1, so a swapped alpha/beta or gamma (not 1 / gamma) would show.
SETTINGS = [(0.7, 0.3, 1.33, 1.0), (0.7, 0.3, 1.33, 0.0), (0.5, 0.5, 1.0, 0.0), (0.2, 0.8, 0.75, 0.5)]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("seed", range(3))
def test_matches_smp_tversky_loss_with_the_parameters_mapped(settings: tuple[float, ...], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    count = [7, 32, 256][seed]
    logits = 2.0 * torch.randn(count, 1, generator=generator, dtype=torch.float64)
    targets = (torch.rand(count, 1, generator=generator) < 0.35).double()
    targets[0] = 1.0  # at least one positive tile: smp zeroes a batch without one (see below)
    ours_logits = logits.float().requires_grad_()
    theirs_logits = logits.clone().requires_grad_()
    ours = FocalTverskyLoss(*settings)(ours_logits, targets.float())
    theirs = _smp_equivalent(*settings)(theirs_logits, targets)
    # Neither library's clamp acts here (1 - TI is far above 1e-7 and so is smp's denominator); what is
    # left is weakseg's float32 arithmetic against smp's float64: a few float32 ulps of values near 0.5.
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    ours.backward()
    theirs.backward()
    assert ours_logits.grad is not None
    torch.testing.assert_close(ours_logits.grad.double(), theirs_logits.grad, atol=1e-6, rtol=1e-4)


def test_differs_from_smp_by_design_on_a_batch_without_positive_tiles() -> None:
    # smp zeroes the loss of a class with no true pixel; weakseg's smoothed index still punishes false
    # positives there (a classifier batch may hold only negative tiles).
    logits = torch.tensor([[2.0], [1.0], [-1.0], [0.5]])
    targets = torch.zeros(4, 1)
    assert _smp_equivalent(0.7, 0.3, 1.33, 1.0)(logits, targets).item() == 0.0
    assert FocalTverskyLoss(0.7, 0.3, 1.33, 1.0)(logits, targets).item() > 0.5


@pytest.mark.parametrize("arguments", [{"gamma": 0.0}, {"alpha": 0.0, "beta": 0.0}, {"alpha": -0.1}, {"smooth": -1.0}])
def test_bad_settings_are_refused(arguments: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FocalTverskyLoss(**arguments)


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        tversky_index(torch.zeros(3), torch.zeros(4), 0.7, 0.3)
