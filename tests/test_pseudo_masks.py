"""Tests of weakseg.pseudo_masks: the refine params as settings, the per-tile jobs, and the summary report."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest

from weakseg.data.layout import Tile
from weakseg.params import RefineParams
from weakseg.pseudo_masks import (
    TileResult,
    flat_metrics,
    needs_normal_tissue_estimate,
    resolve_quantiles,
    settings_from_params,
    summarize,
    tile_jobs,
)
from weakseg.refine import RefineInputError

TILES = [
    Tile("p1.png", "SSA", "train", True),
    Tile("n1.png", "HP", "train", False),
    Tile("p2.png", "SSA", "test", True),
    Tile("n2.png", "HP", "test", False),
]


def test_settings_follow_the_params_and_drop_a_disabled_crf() -> None:
    refine = RefineParams.model_validate(
        {"threshold_quantile": 0.6, "min_object_size": 9, "crf": {"iterations": 3, "bilateral": {"srgb": 7}}}
    )
    settings = settings_from_params(refine)
    assert settings.threshold_quantile == 0.6 and settings.min_object_size == 9
    assert settings.crf is not None and settings.crf.iterations == 3 and settings.crf.bilateral_srgb == 7
    assert settings_from_params(RefineParams.model_validate({"crf": {"enabled": False}})).crf is None


@pytest.mark.parametrize(
    ("threshold", "background", "width", "estimate", "expected"),
    [
        (0.5, None, 0.2, None, (0.5, None)),  # the paper: two labels, no estimate read
        (0.5, 0.1, 0.2, None, (0.5, 0.1)),
        (0.5, "auto", 0.2, 0.3, (0.5, 0.3)),
        (0.5, "auto", 0.2, 0.8, (0.5, 0.5)),  # a numeric cut caps the seeds
        ("auto", "auto", 0.2, 0.3, (0.5, 0.3)),  # the foreground sits a band above the seeds
        ("auto", "auto", 0.2, 0.0, (0.2, 0.0)),  # nothing looks normal: all but the band is foreground
        ("auto", "auto", 0.2, 0.9, (1.0, 0.9)),  # at most 1: no foreground cut past the tissue
        ("auto", "auto", 0.0, 0.3, (0.3, 0.3)),  # no band: seeds and foreground meet
        ("auto", 0.1, 0.25, None, (0.35, 0.1)),  # a fixed seed share needs no estimate
    ],
)
def test_quantiles_resolve_each_auto(
    threshold: float | Literal["auto"],
    background: float | Literal["auto"] | None,
    width: float,
    estimate: float | None,
    expected: tuple,
) -> None:
    refine = RefineParams(threshold_quantile=threshold, background_quantile=background, ignore_band_width=width)
    resolved = resolve_quantiles(refine, estimate)
    assert resolved == pytest.approx(expected) if expected[1] is not None else resolved == expected
    assert needs_normal_tissue_estimate(refine) == (background == "auto")
    settings = settings_from_params(refine, estimate)
    assert (settings.threshold_quantile, settings.background_quantile) == resolved


def test_auto_background_without_an_estimate_is_a_clear_error() -> None:
    for threshold in (0.5, "auto"):
        with pytest.raises(RefineInputError, match=r"metrics/cams\.json"):
            resolve_quantiles(RefineParams(threshold_quantile=threshold, background_quantile="auto"), None)


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
        name,
        True,
        fraction,
        fraction,
        ignored_fraction=0.25,
        counts={step: counts for step in steps},
        iou={step: iou for step in steps},
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
