"""The predict command's work on a folder: listing the images and deciding each tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from weakseg import predict_folder
from weakseg.sliding_window import ImagePrediction


def test_input_folder_problems_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(predict_folder.PredictInputError, match="nothing-here"):
        predict_folder.list_images(tmp_path / "nothing-here")
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(predict_folder.PredictInputError, match="collide"):
        predict_folder.list_images(tmp_path)


def test_gate_empties_the_mask_of_a_tile_decided_negative() -> None:
    probability = np.full((8, 8), 0.9, dtype=np.float32)
    doubtful = ImagePrediction(probability, {"head": 0.7}, 1)
    assert predict_folder.summarize(doubtful, None, 0.5, head_threshold=0.9).mask.all()  # no gate: the mask stays
    gated = predict_folder.summarize(doubtful, None, 0.5, head_threshold=0.9, gate=True)
    assert not gated.mask.any() and not gated.tile_positive
    sure = ImagePrediction(probability, {"head": 0.95, "classifier": 0.6}, 1)
    assert predict_folder.summarize(
        sure, None, 0.5, head_threshold=0.99, gate=True
    ).mask.all()  # the classifier decides


def test_summarize_decides_the_classifier_tile_at_its_own_threshold() -> None:
    prediction = ImagePrediction(np.full((8, 8), 0.9, dtype=np.float32), {"head": 0.95, "classifier": 0.7}, 1)
    result = predict_folder.summarize(prediction, None, 0.5, head_threshold=0.5, gate=True, classifier_threshold=0.8)
    assert (result.tile_threshold, result.tile_positive, bool(result.mask.any())) == (0.8, False, False)
    kept = predict_folder.summarize(prediction, None, 0.5, head_threshold=0.99, gate=True, classifier_threshold=0.6)
    assert kept.tile_positive and kept.mask.all()


def test_summarize_fills_the_holes_the_tissue_restriction_leaves_only_when_asked() -> None:
    prediction = ImagePrediction(np.full((9, 9), 0.9, dtype=np.float32), {"head": 0.95}, 1)
    tissue = np.ones((9, 9), dtype=bool)
    tissue[3:6, 3:6] = False  # a gland's lumen: glass inside the tissue
    kept = predict_folder.summarize(prediction, tissue, 0.5, head_threshold=0.5)
    np.testing.assert_array_equal(kept.mask, tissue)
    filled = predict_folder.summarize(prediction, tissue, 0.5, head_threshold=0.5, fill_holes=True)
    assert filled.mask.all()
    gated = predict_folder.summarize(prediction, tissue, 0.5, head_threshold=0.99, gate=True, fill_holes=True)
    assert not gated.mask.any()  # the gate still empties it
