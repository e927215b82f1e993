"""The ``normalize`` stage: Macenko stain normalization to one reference, and tissue masks.

Reads ``data/raw``; writes ``data/normalized/{images,tissue}/NAME.png``, ``annotations.csv`` (a copy),
``stain_reference.json``, ``figures/normalize/before_after.png`` and ``metrics/normalize.json``.
The reference is fitted on seeded-chosen tiles of the train partition only (or on the tile
``normalize.reference`` names); the work is :mod:`weakseg.normalization`'s.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from weakseg.data.layout import read_annotations
from weakseg.errors import UserInputError
from weakseg.io import atomic_directory, remove_stale_temporaries, write_json
from weakseg.normalization import (
    NormalizeJob,
    before_after_figure,
    build_reference,
    process_tiles,
    recorded_settings,
    summarize,
)
from weakseg.params import NormalizeParams, StageParams
from weakseg.stage import run_stage
from weakseg.stain import save_stain_reference
from weakseg.tracking import stage_run

RAW = Path("data/raw")
NORMALIZED = Path("data/normalized")
FIGURES = Path("figures/normalize")
METRICS = Path("metrics/normalize.json")
# Degenerate tile names listed in the log; all of them go to the metrics file.
LOGGED_NAMES = 20

LOGGER = logging.getLogger(__name__)


def run(params: StageParams) -> None:
    """Fits the reference on train tiles, normalizes every tile, writes masks, metrics and the figure."""
    config: NormalizeParams = params.normalize
    positive_label = params.data.positive_label
    tiles = read_annotations(RAW / "annotations.csv", positive_label)
    names = [tile.name for tile in tiles]
    for name in names:
        if not (RAW / "images" / name).is_file():
            raise UserInputError(f"{RAW / 'images' / name}: listed in annotations.csv but missing")
    reference = build_reference(config, tiles, RAW)
    if reference is not None:
        LOGGER.info(
            "stain reference from %s (%d tiles, %d degenerate skipped): H %s E %s, max concentrations %s",
            reference.source,
            len(reference.fitted_on),
            len(reference.skipped),
            np.round(reference.stain_matrix[:, 0], 3).tolist(),
            np.round(reference.stain_matrix[:, 1], 3).tolist(),
            np.round(reference.max_concentrations, 3).tolist(),
        )
    remove_stale_temporaries(NORMALIZED.parent)
    with atomic_directory(NORMALIZED) as staging:
        (staging / "images").mkdir()
        (staging / "tissue").mkdir()
        outcomes = process_tiles(names, NormalizeJob(RAW / "images", staging, reference, config), config.workers)
        shutil.copyfile(RAW / "annotations.csv", staging / "annotations.csv")
        save_stain_reference(staging / "stain_reference.json", reference, settings=recorded_settings(config))
    metrics = summarize(outcomes, tiles, config)
    degenerate = metrics["degenerate"]["tiles"]
    if degenerate:
        reasons = {outcome.name: outcome.reason for outcome in outcomes if outcome.name in set(degenerate)}
        LOGGER.warning(
            "%d degenerate tile(s) passed through unnormalized: %s%s",
            len(degenerate),
            "; ".join(f"{name} ({reasons[name]})" for name in degenerate[:LOGGED_NAMES]),
            f"; ... (all {len(degenerate)} in {METRICS})" if len(degenerate) > LOGGED_NAMES else "",
        )
    LOGGER.info(
        "%d tiles, %d normalized; spread of mean optical density %.4f -> %.4f",
        metrics["tiles"],
        metrics["normalized"],
        metrics["optical_density"]["mean_std_before"],
        metrics["optical_density"]["mean_std_after"],
    )
    remove_stale_temporaries(FIGURES.parent)
    with atomic_directory(FIGURES) as figures:
        before_after_figure(tiles, config, positive_label, RAW, NORMALIZED, figures / "before_after.png")
    write_json(METRICS, metrics)
    with stage_run("normalize", params.to_flat_dict()) as tracking:
        tracking.log_metrics(metrics)  # the non-numeric leaves (method, tile names) are left out
        tracking.log_artifact(FIGURES / "before_after.png", "figures")
        tracking.log_artifact(METRICS, "metrics")
        tracking.log_artifact(NORMALIZED / "stain_reference.json", "normalize")


if __name__ == "__main__":
    raise SystemExit(run_stage("normalize", run))
