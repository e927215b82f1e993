"""The segmenter's validation: pooled pixel counts without the ignored band, and the head's threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_train_segmenter import TINY_SEGMENTER, _tiny_data
from weakseg.losses.segmentation import SegmentationLoss, SegmentationLossWeights
from weakseg.metrics import PixelCounts
from weakseg.params import SegmenterParams
from weakseg.training.datasets import TileDataset
from weakseg.training.segmenter_data import SegmenterData, batch_loader
from weakseg.training.segmenter_validation import calibrate_head, head_probabilities, validate


class _ShiftedHead(torch.nn.Module):
    """An uncalibrated head: logit 2 (p 0.881) on tiles without the dark blob, 4 (p 0.982) on tiles with it."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dark = (images[:, 0].flatten(1).min(dim=1).values < 0).float()  # normalized red below the mean
        return torch.zeros(len(images), 1, *images.shape[2:]), (2.0 + 2.0 * dark)[:, None]


def test_calibrate_head_moves_the_threshold_of_shifted_scores() -> None:
    validation = _tiny_data(6, 2)
    calibration = calibrate_head(_ShiftedHead(), validation, batch_size=4, device=torch.device("cpu"))
    low, high = 1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(-4.0))
    assert calibration.threshold == pytest.approx((low + high) / 2, abs=1e-6)
    assert calibration.reason == ""
    assert calibration.metrics["balanced_accuracy"] == 1.0 and calibration.metrics["specificity"] == 1.0
    # At 0.5 the same head would call every tile positive.
    scores = head_probabilities(_ShiftedHead(), validation.images, 4, torch.device("cpu"))
    assert np.all(scores > 0.5) and calibration.record()["threshold"] == calibration.threshold


class _EverywhereLesion(torch.nn.Module):
    """Calls every pixel foreground (logit 10) and every tile positive."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((len(images), 1, *images.shape[2:]), 10.0), torch.zeros(len(images), 1)


def test_validation_counts_leave_ignored_pixels_out() -> None:
    """Two 8 x 8 tiles, each 16 foreground, 16 ignored, 32 background pixels, all predicted foreground:
    the ignored pixels are neither true nor false positives."""
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[:, :2] = 1
    masks[:, 2:4] = 255
    dataset = TileDataset(np.zeros((2, 8, 8, 3), dtype=np.uint8), [True, True], masks, None)
    loader = batch_loader(dataset, [[0, 1]], num_workers=0)
    loss = SegmentationLoss(SegmentationLossWeights(**SegmenterParams(**TINY_SEGMENTER).loss.model_dump()))
    result = validate(_EverywhereLesion(), loader, loss, torch.device("cpu"), mixed_precision=False)
    assert result.counts == PixelCounts(true_positive=32, false_positive=64, false_negative=0, true_negative=0)
    assert result.counts.iou == pytest.approx(32 / 96)


def test_calibrate_head_takes_the_decision_rule() -> None:
    # Twelve positives and two negatives: auto lets the positives place the cut, at the lowest positive's score
    # (the head scores every positive alike, so that is their score).
    data = _tiny_data(24, 0)  # alternating positive and negative tiles
    keep = np.r_[np.flatnonzero(data.positives), np.flatnonzero(~data.positives)[:2]]
    validation = SegmenterData(data.images[keep], data.masks[keep], data.positives[keep])
    by_balanced_accuracy = calibrate_head(_ShiftedHead(), validation, batch_size=4, device=torch.device("cpu"))
    auto = calibrate_head(_ShiftedHead(), validation, batch_size=4, device=torch.device("cpu"), rule="auto")
    scores = head_probabilities(_ShiftedHead(), validation.images, 4, torch.device("cpu"))
    assert by_balanced_accuracy.rule == "balanced_accuracy" and auto.rule == "lowest_validation_positive"
    assert auto.threshold == pytest.approx(scores[validation.positives].min())
    assert auto.threshold > by_balanced_accuracy.threshold and auto.metrics["sensitivity"] == 1.0
