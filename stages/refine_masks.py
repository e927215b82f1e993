"""The ``refine_masks`` stage: CAM -> pseudo-mask for every tile, with step-by-step diagnostics.

Reads ``data/cams``, ``data/normalized/{images,tissue,annotations.csv}`` and, where it exists,
``data/raw/masks`` (truth, only to score). Writes ``data/pseudo_masks/NAME.png`` (0 background, 255
foreground and, with ``refine.background_quantile`` set, 128 for the band the segmenter's loss ignores; read
them with :func:`weakseg.io.read_pseudo_mask`), ``metrics/pseudo_masks.json`` and
``figures/refine_masks/contact_sheet.png``.

A negative train tile's pseudo-mask is empty (its label says so; its CAM is not read). Test tiles are
refined whatever their label, since the pipeline does not know it at test time: ``evaluate`` gates them by
the classifier's decision (and, for the ``_oracle_label`` rows and the pseudo-mask reference, by the label).
The work is :mod:`weakseg.pseudo_masks`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

from weakseg.data.layout import pick_figure_tiles, read_annotations
from weakseg.io import atomic_directory, read_json, write_json
from weakseg.parallel import resolve_workers
from weakseg.params import StageParams
from weakseg.pseudo_masks import (
    STEPS,
    RefineStageError,
    contact_sheet,
    flat_metrics,
    needs_normal_tissue_estimate,
    refine_all,
    settings_from_params,
    summarize,
    tile_jobs,
)
from weakseg.stage import run_stage
from weakseg.tracking import stage_run

STAGE = "refine_masks"
NORMALIZED = Path("data/normalized")
CAMS = Path("data/cams")
TRUTH = Path("data/raw/masks")
PSEUDO_MASKS = Path("data/pseudo_masks")
METRICS = Path("metrics/pseudo_masks.json")
CAM_METRICS = Path("metrics/cams.json")  # generate_cams' normal-tissue estimate (the refine quantiles' auto)
FIGURES = Path("figures/refine_masks")

logger = logging.getLogger(STAGE)


def run(params: StageParams) -> None:
    """Refines every tile's CAM into a pseudo-mask and writes the diagnostics."""
    refine = params.refine
    estimate = read_json(CAM_METRICS) if needs_normal_tissue_estimate(refine) and CAM_METRICS.is_file() else {}
    settings = settings_from_params(refine, estimate.get("normal_tissue_fraction"))
    tiles = read_annotations(NORMALIZED / "annotations.csv", params.data.positive_label)
    has_truth = TRUTH.is_dir()
    for folder in (CAMS, NORMALIZED / "images", NORMALIZED / "tissue"):
        if not folder.is_dir():
            raise RefineStageError(f"{folder}: folder not found (run the stages before refine_masks)")
    workers = resolve_workers(refine.workers)
    with atomic_directory(PSEUDO_MASKS) as output:
        jobs = tile_jobs(tiles, NORMALIZED, CAMS, TRUTH if has_truth else None, output)
        # Before MLflow opens its database: the pool forks this process.
        results = refine_all(jobs, settings, workers)
    report = summarize(
        results,
        tiles,
        has_truth,
        STEPS if settings.crf is not None else STEPS[:2],
        ignore_band=settings.background_quantile is not None,
    )
    report["background_quantile"] = settings.background_quantile
    report["threshold_quantile"] = settings.threshold_quantile
    write_json(METRICS, report)
    with atomic_directory(FIGURES) as figures:
        job_of = {job.name: job for job in jobs}
        figure_jobs = [job_of[tile.name] for tile in pick_figure_tiles(tiles, refine.figure_tiles)]
        if figure_jobs:
            contact_sheet(figures / "contact_sheet.png", figure_jobs, settings)
    with stage_run(STAGE, params.to_flat_dict()) as tracker:
        tracker.log_metrics({**flat_metrics(report), "workers": workers}, prefix="pseudo.")
        tracker.log_artifact(METRICS)
        tracker.log_artifact(FIGURES / "contact_sheet.png", folder="figures")
    logger.info("wrote %d pseudo-masks to %s with %d worker(s)", len(results), PSEUDO_MASKS, workers)


if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE, run))
