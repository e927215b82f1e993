"""Tests of weakseg.evaluation_figures: the evaluate stage's figure grids, their columns, gates and titles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from weakseg import evaluation, evaluation_figures, figures
from weakseg.data.layout import Tile

SIZE = 16


def _record(name: str, positive: bool, classifier_probability: float, truth: bool) -> evaluation.TestTile:
    lesion = np.zeros((SIZE, SIZE), dtype=bool)
    lesion[4:10, 4:10] = True
    rng = np.random.default_rng(0)
    return evaluation.TestTile(
        tile=Tile(name, "SSA" if positive else "HP", "test", positive),
        prediction=lesion.copy(),
        pseudo=lesion.copy(),
        cam_mask=lesion.copy(),
        tissue=np.ones((SIZE, SIZE), dtype=bool),
        truth=(lesion if positive else np.zeros_like(lesion)) if truth else None,
        classifier_probability=classifier_probability,
        head_probability=0.4,
        image=rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
        probability=rng.random((SIZE, SIZE)),
    )


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """Records every grid the module saves (rows and options), by file name, and still writes it."""
    recorded: dict[str, dict[str, Any]] = {}
    original = figures.save_figure

    def recording(path: Path, rows: list, **options: Any) -> None:
        recorded[Path(path).name] = {"rows": rows, **options}
        original(path, rows, **options)

    monkeypatch.setattr(figures, "save_figure", recording)
    return recorded


def _curves() -> list[evaluation.RocCurve]:
    points = [{"fpr": 0.0, "tpr": 0.0, "threshold": 1.0}, {"fpr": 1.0, "tpr": 1.0, "threshold": 0.0}]
    return [("classifier", points, 0.5), ("segmenter head", points, 0.5), ("segmenter area", points, 0.5)]


def test_figures_with_truth_show_the_classifier_gated_cam_and_pseudo_errors(
    tmp_path: Path, saved: dict[str, dict[str, Any]]
) -> None:
    # A negative tile the classifier calls negative: its pseudo-mask reference (label) and its CAM and
    # pseudo-mask (classifier) are gated to empty masks, so the CAM error map is all black.
    shown = [_record("p.png", True, 0.9, truth=True), _record("n.png", False, 0.2, truth=True)]
    evaluation_figures.write_evaluation_figures(tmp_path, shown, True, 0.5, 0.5, _curves())
    assert sorted(path.name for path in tmp_path.glob("*.png")) == [
        "error_maps.png",
        "overlays.png",
        "roc_curves.png",
        "uncertainty.png",
    ]
    overlays, errors = saved["overlays.png"], saved["error_maps.png"]
    assert overlays["column_titles"][:3] == ["tile", "pseudo-mask", "true mask"]
    assert "prediction (p>=0.5)" in overlays["column_titles"]
    assert "Error maps against true masks" in errors["title"]
    assert [len(row) for row in errors["rows"]] == [6, 6]
    assert not overlays["rows"][1][1].any()  # the negative tile's label-gated pseudo-mask
    assert not errors["rows"][1][4].any()  # its gated CAM against an empty truth: all true negative
    assert errors["rows"][0][4].any()  # the positive tile's CAM is kept
    assert overlays["row_titles"][0] == "p\nSSA | clf p=0.90\nseg head p=0.40"


def test_figures_without_truth_compare_against_pseudo_masks(tmp_path: Path, saved: dict[str, dict[str, Any]]) -> None:
    shown = [_record("p.png", True, 0.9, truth=False)]
    evaluation_figures.write_evaluation_figures(tmp_path, shown, False, 0.3, 0.5, _curves())
    assert "true mask" not in saved["overlays.png"]["column_titles"]
    assert "prediction (p>=0.3)" in saved["overlays.png"]["column_titles"]
    assert "against pseudo-masks" in saved["error_maps.png"]["title"]
    assert [len(row) for row in saved["error_maps.png"]["rows"]] == [4]


def test_a_figure_tile_without_its_image_is_an_input_error(tmp_path: Path) -> None:
    record = _record("p.png", True, 0.9, truth=False)
    record.image = None
    with pytest.raises(evaluation.EvaluateInputError, match="p.png"):
        evaluation_figures.write_evaluation_figures(tmp_path, [record], False, 0.5, 0.5, _curves())
