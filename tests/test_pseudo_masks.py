"""Tests of weakseg.pseudo_masks: the refine params as settings, the per-tile jobs, and the summary report."""

from __future__ import annotations

from pathlib import Path

import pytest

from weakseg.data.layout import Tile
from weakseg.params import RefineParams
from weakseg.pseudo_masks import TileResult, flat_metrics, settings_from_params, summarize, tile_jobs

TILES = [
    Tile("p1.png", "SSA", "train", True),
    Tile("n1.png", "HP", "train", False),
    Tile("p2.png", "SSA", "test", True),
    Tile("n2.png", "HP", "test", False),
]


def test_settings_follow_the_params_and_drop_a_disabled_crf() -> None:
    refine = RefineParams(threshold_quantile=0.6, min_object_size=9, crf={"iterations": 3, "bilateral": {"srgb": 7}})
    settings = settings_from_params(refine)
    assert settings.threshold_quantile == 0.6 and settings.min_object_size == 9
    assert settings.crf is not None and settings.crf.iterations == 3 and settings.crf.bilateral_srgb == 7
    assert settings_from_params(RefineParams(crf={"enabled": False})).crf is None


def test_negative_train_tiles_are_not_refined_and_truth_is_optional(tmp_path: Path) -> None:
    jobs = tile_jobs(TILES, tmp_path / "normalized", tmp_path / "cams", tmp_path / "truth", tmp_path / "out")
    assert [job.refine for job in jobs] == [True, False, True, True]
    assert jobs[0].image == tmp_path / "normalized" / "images" / "p1.png"
    assert jobs[0].tissue == tmp_path / "normalized" / "tissue" / "p1.png"
    assert jobs[0].cam == tmp_path / "cams" / "p1.png" and jobs[0].output == tmp_path / "out" / "p1.png"
    assert jobs[0].truth == tmp_path / "truth" / "p1.png"
    assert all(job.truth is None for job in tile_jobs(TILES, tmp_path, tmp_path, None, tmp_path))


def scored(name: str, counts: tuple[int, int, int, int], iou: float, fraction: float) -> TileResult:
    steps = ("threshold", "morphology", "crf")
    return TileResult(
        name, True, fraction, fraction, ignored_fraction=0.25,
        counts={step: counts for step in steps}, iou={step: iou for step in steps},
    )


def test_summary_pools_counts_over_positive_tiles_and_counts_nonempty_negatives() -> None:
    results = [
        scored("p1.png", (6, 2, 2, 90), 0.6, 0.5),
        TileResult("n1.png", False, 0.0, 0.0),
        scored("p2.png", (1, 0, 3, 96), 0.25, 0.0),
        TileResult("n2.png", False, 0.1, 0.1),
    ]
    report = summarize(results, TILES, has_truth=True, steps=("threshold", "morphology"), ignore_band=True)
    assert report["tiles"] == 4 and report["has_truth"] is True
    train, test = report["train"], report["test"]
    assert train["vs_truth"]["threshold"] == {"iou": 0.6, "dice": 0.75, "iou_positive_mean": 0.6}
    assert set(train["vs_truth"]) == {"positive_tiles", "threshold", "morphology"}
    assert train["coverage"]["negative_nonempty_tiles"] == 0 and test["coverage"]["negative_nonempty_tiles"] == 1
    assert test["coverage"]["positive_empty_fraction"] == 1.0
    assert train["coverage"]["positive_ignored_of_tissue"]["mean"] == 0.25
    flat = flat_metrics(report)
    assert flat["train.vs_truth.threshold.dice"] == 0.75 and flat["test.coverage_ignored_of_tissue_mean"] == 0.25
    assert "train.vs_truth.crf.iou" not in flat
    without = summarize(results, TILES, has_truth=False)
    assert "vs_truth" not in without["train"] and "positive_ignored_of_tissue" not in without["train"]["coverage"]
    assert without["train"]["coverage"]["positive"] == pytest.approx(
        {"mean": 0.5, "median": 0.5, "min": 0.5, "max": 0.5}
    )
