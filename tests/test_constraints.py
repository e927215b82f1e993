"""Multiple-instance and size-constraint losses on hand-made logits whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from weakseg.losses.constraints import (
    multiple_instance_loss,
    size_constraint_loss,
    soft_size,
    top_fraction_pool,
)


def test_top_fraction_pool_averages_the_highest_logits_inside_the_region_only() -> None:
    logits = torch.tensor([[[9.0, 1.0], [2.0, 3.0]], [[0.0, 4.0], [8.0, -1.0]]])
    region = torch.tensor([[[False, True], [True, True]], [[True, True], [True, True]]])
    # Tile 0: region holds 1, 2, 3 (the 9 is outside); half of 3 pixels rounds up to 2 -> (3 + 2) / 2.
    # Tile 1: all four; two highest are 8 and 4.
    pooled = top_fraction_pool(logits, region, 0.5)
    assert pooled.tolist() == [2.5, 6.0]


def test_top_fraction_pool_of_one_is_the_region_mean_and_an_empty_region_is_nan() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    region = torch.tensor([[True, True, True, True], [False, False, False, False]])
    pooled = top_fraction_pool(logits, region, 1.0)
    assert pooled[0].item() == 3.0
    assert math.isnan(pooled[1].item())


def test_top_fraction_pool_refuses_a_fraction_outside_zero_one() -> None:
    with pytest.raises(ValueError, match="top_fraction"):
        top_fraction_pool(torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool), 0.0)


def test_multiple_instance_loss_is_bce_of_the_pooled_logit_against_the_label() -> None:
    logits = torch.tensor([[[[4.0, -2.0], [-2.0, -2.0]]], [[[1.0, 1.0], [-3.0, -3.0]]]])
    region = torch.ones_like(logits, dtype=torch.bool)
    labels = torch.tensor([1.0, 0.0])
    # top 25 % of 4 pixels = 1 pixel: pooled logits 4 (positive tile) and 1 (negative tile).
    expected = F.binary_cross_entropy_with_logits(torch.tensor([4.0, 1.0]), labels)
    assert torch.isclose(multiple_instance_loss(logits, region, labels, 0.25), expected)


def test_multiple_instance_loss_skips_tiles_without_region_and_raises_the_best_pixel_of_a_positive() -> None:
    logits = torch.tensor([[0.0, -1.0, -5.0], [3.0, 3.0, 3.0]], requires_grad=True)
    region = torch.tensor([[True, True, True], [False, False, False]])
    labels = torch.tensor([1.0, 0.0])
    loss = multiple_instance_loss(logits, region, labels, 0.3)
    assert torch.isclose(loss, F.binary_cross_entropy_with_logits(torch.tensor([0.0]), torch.tensor([1.0])))
    loss.backward()
    grad = logits.grad
    assert grad is not None
    assert grad[0, 0] < 0  # descending raises the highest pixel of the positive tile
    assert grad[0, 1] == 0 and grad[0, 2] == 0  # the others are not pooled
    assert torch.all(grad[1] == 0)  # the tile without region takes no part


def test_multiple_instance_loss_of_a_batch_without_any_region_is_zero_with_a_gradient() -> None:
    logits = torch.zeros(2, 1, 2, 2, requires_grad=True)
    loss = multiple_instance_loss(logits, torch.zeros(2, 1, 2, 2, dtype=torch.bool), torch.tensor([1.0, 0.0]), 0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_soft_size_is_the_mean_probability_inside_the_region() -> None:
    logits = torch.tensor([[0.0, 100.0, -100.0, 100.0]])
    region = torch.tensor([[True, True, True, False]])
    assert torch.isclose(soft_size(logits, region), torch.tensor([(0.5 + 1.0 + 0.0) / 3]))


def test_size_constraint_is_zero_inside_the_bounds_and_a_squared_hinge_outside() -> None:
    big = 50.0
    # Three positive tiles of 4 region pixels with sizes 0.25, 0.5 and 1.0; bounds [0.4, 0.75].
    logits = torch.tensor([[big, -big, -big, -big], [big, big, -big, -big], [big, big, big, big], [big, big, big, big]])
    region = torch.ones_like(logits, dtype=torch.bool)
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the negative tile (size 1.0) takes no part
    expected = ((0.4 - 0.25) ** 2 + 0.0 + (1.0 - 0.75) ** 2) / 3
    assert size_constraint_loss(logits, region, labels, 0.4, 0.75).item() == pytest.approx(expected, abs=1e-6)


def test_size_constraint_gradient_grows_a_too_small_positive_tile() -> None:
    logits = torch.full((1, 1, 3, 3), -4.0, requires_grad=True)
    region = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    region[0, 0, 0, 0] = False
    loss = size_constraint_loss(logits, region, torch.tensor([1.0]), 0.5, 1.0)
    loss.backward()
    grad = logits.grad
    assert grad is not None
    assert torch.all(grad[region] < 0)  # descending raises every pixel inside the region
    assert grad[0, 0, 0, 0] == 0  # outside it, nothing


def test_size_constraint_without_positive_tiles_is_zero_and_bad_bounds_are_refused() -> None:
    logits = torch.zeros(2, 4)
    region = torch.ones(2, 4, dtype=torch.bool)
    assert size_constraint_loss(logits, region, torch.tensor([0.0, 0.0]), 0.3, 1.0).item() == 0.0
    with pytest.raises(ValueError, match="lower <= upper"):
        size_constraint_loss(logits, region, torch.tensor([1.0, 0.0]), 0.8, 0.2)


def test_shapes_that_do_not_match_are_refused() -> None:
    with pytest.raises(ValueError, match="same tiles"):
        multiple_instance_loss(torch.zeros(2, 4), torch.ones(2, 5, dtype=torch.bool), torch.zeros(2), 0.5)
