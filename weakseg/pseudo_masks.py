"""The ``refine_masks`` stage's work: CAM -> pseudo-mask for every tile, scored step by step, and its figure.

Each tile is refined by :func:`weakseg.refine.refine_pseudo_mask` on a process pool
(:mod:`weakseg.parallel`); a worker reads its tile's files and writes its pseudo-mask (0 background, 255
foreground, 128 ignored: :func:`weakseg.io.pseudo_mask_pixels`), so only small per-tile numbers cross process
boundaries. A negative train tile's pseudo-mask is empty (its label says so; its CAM is not read). Test tiles
are refined whatever their label, since the pipeline does not know it at test time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from weakseg.data.layout import PARTITIONS, Tile
from weakseg.errors import UserInputError
from weakseg.figures import heatmap, overlay_mask, save_figure
from weakseg.io import pseudo_mask_pixels, read_gray, read_mask, read_rgb, write_png
from weakseg.metrics import PixelCounts, tile_iou
from weakseg.parallel import map_in_processes
from weakseg.params import RefineParams
from weakseg.refine import (
    CrfSettings,
    RefineInputError,
    RefinementSteps,
    RefineSettings,
    foreground_fraction,
    refine_pseudo_mask,
)

STEPS = ("threshold", "morphology", "crf")


class RefineStageError(UserInputError):
    """Raised when the stage's inputs do not fit together."""


def settings_from_params(refine: RefineParams, normal_tissue_fraction: float | None = None) -> RefineSettings:
    """The ``refine`` params block as the plain settings :func:`refine_pseudo_mask` takes.

    Args:
        refine: the params block.
        normal_tissue_fraction: generate_cams' estimate (``metrics/cams.json``), which
            ``background_quantile: auto`` takes as its quantile (and ``threshold_quantile: auto`` builds on).

    Raises:
        RefineInputError: for an ``auto`` quantile that needs the estimate without one.
    """
    crf = refine.crf
    crf_settings = (
        CrfSettings(
            iterations=crf.iterations,
            unary=crf.unary,
            hard_confidence=crf.hard_confidence,
            gaussian_sxy=crf.gaussian.sxy,
            gaussian_compat=crf.gaussian.compat,
            bilateral_sxy=crf.bilateral.sxy,
            bilateral_srgb=crf.bilateral.srgb,
            bilateral_compat=crf.bilateral.compat,
        )
        if crf.enabled
        else None
    )
    threshold_quantile, background_quantile = resolve_quantiles(refine, normal_tissue_fraction)
    return RefineSettings(
        threshold_quantile=threshold_quantile,
        restrict_to_tissue=refine.restrict_to_tissue,
        opening_kernel=refine.opening_kernel,
        closing_kernel=refine.closing_kernel,
        min_object_size=refine.min_object_size,
        crf=crf_settings,
        background_quantile=background_quantile,
    )


def needs_normal_tissue_estimate(refine: RefineParams) -> bool:
    """Whether :func:`resolve_quantiles` reads generate_cams' normal-tissue estimate for these params."""
    return refine.background_quantile == "auto"


def resolve_quantiles(refine: RefineParams, normal_tissue_fraction: float | None) -> tuple[float, float | None]:
    """The foreground's and the background's CAM quantiles, each ``auto`` replaced by its value.

    ``background_quantile: auto`` is the estimated normal share, capped at a numeric ``threshold_quantile``.
    ``threshold_quantile: auto`` is the background quantile plus ``ignore_band_width``, at most 1: the
    foreground is the tissue above the seeds and the band, so where nothing looks normal (EBHI: a share near
    0) it is most of a positive tile's tissue, and where much does (the demo) it is what the seeds leave.

    Args:
        refine: the params block.
        normal_tissue_fraction: generate_cams' estimate, or None where there is none.

    Returns:
        ``(threshold_quantile, background_quantile)``; the second is None for two-label masks.

    Raises:
        RefineInputError: for ``background_quantile: auto`` without an estimate.
    """
    background = refine.background_quantile
    if background == "auto":
        if normal_tissue_fraction is None:
            raise RefineInputError(
                "refine.background_quantile: auto needs the normal-tissue estimate of generate_cams "
                "(metrics/cams.json: normal_tissue_fraction); re-run generate_cams"
            )
        background = min(max(float(normal_tissue_fraction), 0.0), 1.0)
    if refine.threshold_quantile == "auto":
        if background is None:  # the params schema refuses this pair; a clear error for hand-built params
            raise RefineInputError("refine.threshold_quantile: auto needs refine.background_quantile, got null")
        return min(background + refine.ignore_band_width, 1.0), background
    threshold = float(refine.threshold_quantile)
    return threshold, None if background is None else min(background, threshold)


@dataclass(frozen=True)
class TileJob:
    """What a worker needs for one tile: paths only, so little crosses process boundaries."""

    name: str
    positive: bool
    refine: bool  # False: an empty pseudo-mask without reading the CAM (a negative train tile)
    image: Path
    tissue: Path
    cam: Path
    truth: Path | None
    output: Path


@dataclass
class TileResult:
    """What a worker reports for one tile (the mask itself is already on disk)."""

    name: str
    positive: bool
    foreground_fraction: float
    tissue_fraction: float
    ignored_fraction: float = 0.0  # the ignored share of the tissue (refine.background_quantile)
    # Per step: (true_positive, false_positive, false_negative, true_negative), and the tile IoU.
    counts: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    iou: dict[str, float] = field(default_factory=dict)


def load_tile(job: TileJob) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads one tile's CAM, normalized image and tissue mask, checking that their sizes agree."""
    cam = read_gray(job.cam)
    image = read_rgb(job.image)
    tissue = read_mask(job.tissue)
    if image.shape[:2] != cam.shape or tissue.shape != cam.shape:
        raise RefineStageError(
            f"{job.cam}: CAM size {cam.shape} differs from {job.image} {image.shape[:2]} or {job.tissue} "
            f"{tissue.shape}; re-run generate_cams"
        )
    return cam, image, tissue


def refine_tile(job: TileJob, settings: RefineSettings) -> TileResult:
    """Refines one tile, writes its pseudo-mask, and scores each step against the truth where it exists."""
    if not job.refine:
        tissue = read_mask(job.tissue)
        write_png(job.output, np.zeros(tissue.shape, dtype=bool))
        return TileResult(name=job.name, positive=job.positive, foreground_fraction=0.0, tissue_fraction=0.0)
    cam, image, tissue = load_tile(job)
    steps = refine_pseudo_mask(cam, image, tissue, True, settings)
    write_png(job.output, pseudo_mask_pixels(steps.refined, steps.ignore))
    result = TileResult(
        name=job.name,
        positive=job.positive,
        foreground_fraction=foreground_fraction(steps.refined),
        tissue_fraction=foreground_fraction(steps.refined, tissue),
        ignored_fraction=foreground_fraction(steps.ignore, tissue),
    )
    if job.truth is not None and job.positive:
        truth = read_mask(job.truth)
        if truth.shape != cam.shape:
            raise RefineStageError(f"{job.truth}: mask size {truth.shape} differs from the tile's {cam.shape}")
        for step, mask in zip(STEPS, (steps.thresholded, steps.morphology, steps.refined), strict=True):
            counts = PixelCounts().add(mask, truth)
            result.counts[step] = (
                counts.true_positive,
                counts.false_positive,
                counts.false_negative,
                counts.true_negative,
            )
            result.iou[step] = tile_iou(mask, truth)
    return result


def tile_jobs(tiles: Sequence[Tile], normalized: Path, cams: Path, truth: Path | None, output: Path) -> list[TileJob]:
    """One job per tile: negative train tiles get an empty pseudo-mask, every other tile is refined.

    Args:
        tiles: every tile of the dataset.
        normalized: the ``normalize`` stage's folder (``images/``, ``tissue/``).
        cams: the ``generate_cams`` stage's folder.
        truth: the folder of pixel truth, or None where the dataset has none.
        output: where the pseudo-masks go.
    """
    return [
        TileJob(
            name=tile.name,
            positive=tile.positive,
            refine=tile.positive or tile.partition == "test",
            image=normalized / "images" / tile.name,
            tissue=normalized / "tissue" / tile.name,
            cam=cams / tile.name,
            truth=(truth / tile.name) if truth is not None else None,
            output=output / tile.name,
        )
        for tile in tiles
    ]


def refine_all(
    jobs: Sequence[TileJob], settings: RefineSettings, workers: int, progress: bool = True
) -> list[TileResult]:
    """Refines every tile, in a process pool when ``workers > 1`` (0: every core); results in ``jobs`` order.

    Each tile is independent and deterministic, so the outputs do not depend on the worker count. Call it
    before opening an MLflow run or any other threads' resources: the pool forks this process.
    """
    return map_in_processes(partial(refine_tile, settings=settings), jobs, workers, "pseudo-masks", progress=progress)


def _summary(values: Sequence[float]) -> dict[str, float]:
    """Mean, median, min and max of ``values`` (zeros when there are none)."""
    if not values:
        return {"mean": 0.0, "median": 0.0, "min": 0.0, "max": 0.0}
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def summarize(
    results: Sequence[TileResult],
    tiles: Sequence[Tile],
    has_truth: bool,
    steps: Sequence[str] = STEPS,
    ignore_band: bool = False,
) -> dict[str, Any]:
    """``metrics/pseudo_masks.json``: coverage per partition and class, and per-step truth scores.

    Truth scores are over positive tiles of each partition: pooled ``iou``/``dice`` (confusion counts
    summed over pixels) and ``iou_positive_mean`` (mean per-tile IoU). Negative train tiles are empty by
    construction; negative test tiles are refined like any test tile (``negative_nonempty_tiles`` counts
    those with a mask, which ``evaluate`` then gates by the classifier's decision). ``steps`` names the
    steps to report (``crf`` is left out when the CRF is off, as it would repeat ``morphology``).
    With ``ignore_band`` (``refine.background_quantile`` set), ``coverage.positive_ignored_of_tissue``
    summarises the ignored share of each positive tile's tissue, beside ``positive_of_tissue``. Truth scores
    count ignored pixels as not foreground.
    """
    partition_of = {tile.name: tile.partition for tile in tiles}
    report: dict[str, Any] = {"tiles": len(results), "has_truth": has_truth}
    for partition in PARTITIONS:
        members = [result for result in results if partition_of[result.name] == partition]
        positives = [result for result in members if result.positive]
        negatives = [result for result in members if not result.positive]
        section: dict[str, Any] = {
            "tiles": len(members),
            "positive_tiles": len(positives),
            "negative_tiles": len(negatives),
            "coverage": {
                "positive": _summary([result.foreground_fraction for result in positives]),
                "positive_of_tissue": _summary([result.tissue_fraction for result in positives]),
                "positive_empty_fraction": (
                    float(np.mean([result.foreground_fraction == 0.0 for result in positives])) if positives else 0.0
                ),
                "negative_nonempty_tiles": int(sum(result.foreground_fraction > 0.0 for result in negatives)),
            },
        }
        if ignore_band:
            section["coverage"]["positive_ignored_of_tissue"] = _summary(
                [result.ignored_fraction for result in positives]
            )
        scored = [result for result in positives if result.counts]
        if has_truth and scored:
            step_scores: dict[str, Any] = {}
            for step in steps:
                pooled = PixelCounts()
                for result in scored:
                    true_positive, false_positive, false_negative, true_negative = result.counts[step]
                    pooled.true_positive += true_positive
                    pooled.false_positive += false_positive
                    pooled.false_negative += false_negative
                    pooled.true_negative += true_negative
                step_scores[step] = {
                    "iou": pooled.iou,
                    "dice": pooled.dice,
                    "iou_positive_mean": float(np.mean([result.iou[step] for result in scored])),
                }
            section["vs_truth"] = {"positive_tiles": len(scored), **step_scores}
        report[partition] = section
    return report


def contact_sheet(
    path: Path,
    jobs: Sequence[TileJob],
    settings: RefineSettings,
    load: Callable[[TileJob], tuple[np.ndarray, np.ndarray, np.ndarray]] = load_tile,
) -> None:
    """Tile, CAM, thresholded CAM, after morphology, pseudo-mask (and truth) for a few tiles."""
    with_truth = any(job.truth is not None for job in jobs)
    rows: list[list[np.ndarray]] = []
    titles: list[str] = []
    for job in jobs:
        cam, image, tissue = load(job)
        steps: RefinementSteps = refine_pseudo_mask(cam, image, tissue, job.refine, settings)
        row = [
            image,
            heatmap(cam.astype(np.float64) / 255.0),
            overlay_mask(image, steps.thresholded, colour=(255, 255, 0)),
            overlay_mask(image, steps.morphology, colour=(255, 128, 0)),
            overlay_mask(image, steps.refined),
        ]
        if settings.background_quantile is not None:
            row[-1] = overlay_mask(row[-1], steps.ignore, colour=(128, 128, 128))
        if with_truth:
            truth = read_mask(job.truth) if job.truth is not None else np.zeros(cam.shape, dtype=bool)
            row.append(overlay_mask(image, truth, colour=(0, 128, 255)))
        rows.append(row)
        titles.append(f"{Path(job.name).stem} ({'positive' if job.positive else 'negative'})")
    columns = ["tile", "CAM", "thresholded", "morphology", "pseudo-mask (CRF)" if settings.crf else "pseudo-mask"]
    if settings.background_quantile is not None:
        columns[-1] = "pseudo-mask (grey: ignored)"
    if with_truth:
        columns.append("truth")
    save_figure(path, rows, column_titles=columns, row_titles=titles, title="refine_masks: CAM -> pseudo-mask")


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The numbers of :func:`summarize`'s report that the stage logs to MLflow, by dotted name."""
    flat: dict[str, float] = {}
    if report.get("background_quantile") is not None:  # the band's lower quantile, as set or estimated (auto)
        flat["background_quantile"] = report["background_quantile"]
    if report.get("threshold_quantile") is not None:  # the foreground's quantile, as set or resolved (auto)
        flat["threshold_quantile"] = report["threshold_quantile"]
    for partition in PARTITIONS:
        section = report.get(partition, {})
        flat[f"{partition}.coverage_positive_mean"] = section.get("coverage", {}).get("positive", {}).get("mean", 0.0)
        ignored = section.get("coverage", {}).get("positive_ignored_of_tissue")
        if ignored is not None:
            flat[f"{partition}.coverage_ignored_of_tissue_mean"] = ignored["mean"]
        for step in STEPS:
            scores = section.get("vs_truth", {}).get(step)
            if scores:
                for key, value in scores.items():
                    flat[f"{partition}.vs_truth.{step}.{key}"] = value
    return flat
