"""The classifier's loss: BCE + Focal Tversky, their weights, the BCE term's pos_weight, and the ratio behind it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weakseg.losses.classification import ClassificationLoss, positive_weight
from weakseg.losses.focal_tversky import FocalTverskyLoss

LOGITS = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.5, 0.0, -0.5, 4.0])
LABELS = [True, True, False, False, False, False, False, False]  # 6 negatives / 2 positives
TARGETS = torch.tensor(LABELS, dtype=torch.float32)


def test_the_loss_is_the_weighted_sum_of_bce_and_focal_tversky() -> None:
    loss = ClassificationLoss(0.3, 2.0, alpha=0.7, beta=0.3, gamma=1.33)(LOGITS, TARGETS)
    bce = torch.nn.BCEWithLogitsLoss()(LOGITS, TARGETS)
    focal_tversky = FocalTverskyLoss(0.7, 0.3, 1.33)(LOGITS, TARGETS)
    assert float(loss) == pytest.approx(0.3 * float(bce) + 2.0 * float(focal_tversky), rel=1e-6)


def test_a_zero_weight_leaves_its_term_out() -> None:
    only_bce = ClassificationLoss(1.0, 0.0, 0.7, 0.3, 1.33)(LOGITS, TARGETS)
    only_focal_tversky = ClassificationLoss(0.0, 1.0, 0.7, 0.3, 1.33)(LOGITS, TARGETS)
    assert float(only_bce) == pytest.approx(float(torch.nn.BCEWithLogitsLoss()(LOGITS, TARGETS)), rel=1e-6)
    focal_tversky = FocalTverskyLoss(0.7, 0.3, 1.33)(LOGITS, TARGETS)
    assert float(only_focal_tversky) == pytest.approx(float(focal_tversky), rel=1e-6)


def test_logits_of_any_shape_and_dtype_are_flattened_to_float32() -> None:
    loss = ClassificationLoss(1.0, 1.0, 0.7, 0.3, 1.33)
    flat = loss(LOGITS, TARGETS)
    column = loss(LOGITS.to(torch.bfloat16).float()[:, None], TARGETS[:, None])
    assert flat.dtype == torch.float32 and float(column) == pytest.approx(float(flat))


def test_pos_weight_is_torchs_bce_pos_weight() -> None:
    weighted = ClassificationLoss(1.0, 0.0, 0.7, 0.3, 1.33, pos_weight=3.0)(LOGITS, TARGETS)
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0))(LOGITS, TARGETS)
    assert float(weighted) == pytest.approx(float(expected), rel=1e-6)
    assert float(weighted) != pytest.approx(float(torch.nn.BCEWithLogitsLoss()(LOGITS, TARGETS)))


def test_positive_weight_is_negatives_over_positives_and_none_for_one_class() -> None:
    assert positive_weight(LABELS) == pytest.approx(3.0)
    assert positive_weight(np.array([[True], [False], [False]])) == pytest.approx(2.0)
    assert positive_weight([True, True]) is None
    assert positive_weight([False]) is None
    assert positive_weight([]) is None
