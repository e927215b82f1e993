"""The classifier's validation: logits in loader order, the decision threshold, the majority-class rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_train_classifier import TILE
from weakseg.metrics import classification_scores
from weakseg.training import classifier_data, classifier_validation
from weakseg.training.datasets import TileDataset


def test_majority_class_rate() -> None:
    assert classifier_validation.majority_class_rate([True, False, False, False]) == pytest.approx(0.75)
    assert classifier_validation.majority_class_rate([True, True, False]) == pytest.approx(2 / 3)


class _Shifted(torch.nn.Module):
    """A classifier that ranks tiles by brightness perfectly but calls every one positive at 0.5."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))[:, None] + 3.0


def test_decision_threshold_of_a_shifted_classifier_is_chosen_on_validation() -> None:
    labels = [True, False, True, False, True, False]
    images = np.stack([np.full((TILE, TILE, 3), 200 if positive else 100, dtype=np.uint8) for positive in labels])
    validation = TileDataset(images, labels)
    decision = classifier_validation.calibrate_decision(_Shifted(), validation, 4, torch.device("cpu"))
    loader = classifier_data.build_eval_loader(validation, 4)
    logits, _ = classifier_validation.predict_logits(_Shifted(), loader, torch.device("cpu"))
    low, high = sorted(set(torch.sigmoid(logits).tolist()))
    assert low > 0.5  # at 0.5 every tile is called positive: specificity 0
    assert decision.threshold == pytest.approx((low + high) / 2) and decision.reason == ""
    assert (decision.metrics["sensitivity"], decision.metrics["specificity"]) == (1.0, 1.0)
    # A tile scoring between 0.5 and the chosen threshold is negative by it.
    between = (0.5 + decision.threshold) / 2
    assert classification_scores([False], [between], decision.threshold)["specificity"] == 1.0
    # One class only: 0.5, with the reason.
    one_class = classifier_validation.choose_decision(torch.ones(3), torch.tensor([0.1, 2.0, 3.0]))
    assert one_class.threshold == 0.5 and "only positive" in one_class.reason
    assert "threshold_reason" in one_class.record()
