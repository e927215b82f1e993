"""The ``normalize`` stage: Macenko stain normalization to one reference, and tissue masks.

Reads ``data/raw``; writes ``data/normalized/{images,tissue}/NAME.png``, ``annotations.csv`` (a copy),
``stain_reference.json``, ``figures/normalize/before_after.png`` and ``metrics/normalize.json``.
The reference is fitted on seeded-chosen tiles of the train partition only (or on the tile
``normalize.reference`` names). Tiles are processed by a process pool; each worker reads, normalizes and
writes its own tiles, so only small per-tile numbers cross process boundaries.
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from weakseg.data.layout import Tile, partition, read_annotations
from weakseg.errors import UserInputError
from weakseg.figures import overlay_mask, save_figure
from weakseg.io import atomic_directory, read_mask, read_rgb, remove_stale_temporaries, write_json, write_png
from weakseg.params import NormalizeParams, StageParams
from weakseg.stage import run_stage
from weakseg.stain import (
    StainReference,
    colour_features,
    colour_separability_auc,
    degenerate_reason,
    fit_stain_reference,
    mean_optical_density,
    normalize_tile,
    save_stain_reference,
    tissue_mask,
)
from weakseg.tracking import stage_run

RAW = Path("data/raw")
NORMALIZED = Path("data/normalized")
FIGURES = Path("figures/normalize")
METRICS = Path("metrics/normalize.json")
# Degenerate tile names listed in the log; all of them go to the metrics file.
LOGGED_NAMES = 20

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileOutcome:
    """What one tile's processing reports back to the stage."""

    name: str
    normalized: bool
    reason: str
    tissue_fraction: float
    density_before: np.ndarray
    density_after: np.ndarray
    features_before: np.ndarray
    features_after: np.ndarray


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs besides the tile's name (sent once per worker)."""

    images: Path
    output: Path
    reference: StainReference | None
    config: NormalizeParams


_JOB: _Job | None = None


def _start_worker(job: _Job) -> None:
    global _JOB
    _JOB = job
    # One BLAS thread per process: the pool already fills the cores.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def process_tile(name: str, job: _Job | None = None) -> TileOutcome:
    """Reads one raw tile, writes its normalized tile and tissue mask, and measures both versions."""
    job = job or _JOB
    if job is None:
        raise RuntimeError("process_tile needs a job, or a pool started with _start_worker")
    config = job.config
    image = read_rgb(job.images / name)
    mask = tissue_mask(image, **tissue_settings(config))
    normalized, changed = normalize_tile(image, job.reference, config.min_tissue_fraction)
    reason = ""
    if job.reference is not None and not changed:
        reason = degenerate_reason(image, job.reference, config.min_tissue_fraction) or "non-finite result"
    write_png(job.output / "images" / name, normalized)
    write_png(job.output / "tissue" / name, mask)
    io = config.background_intensity
    return TileOutcome(
        name=name,
        normalized=changed,
        reason=reason,
        tissue_fraction=float(mask.mean()),
        density_before=mean_optical_density(image, mask, io),
        density_after=mean_optical_density(normalized, mask, io),
        features_before=colour_features(image, background_intensity=io),
        features_after=colour_features(normalized, background_intensity=io),
    )


def process_tiles(names: list[str], job: _Job, workers: int) -> list[TileOutcome]:
    """Processes tiles on ``workers`` processes (0: every core) with a progress bar; results in ``names`` order."""
    if workers == 0:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(workers, len(names)))
    progress = tqdm(total=len(names), desc="normalize", unit="tile", leave=False)
    try:
        if workers == 1:
            outcomes = []
            for name in names:
                outcomes.append(process_tile(name, job))
                progress.update()
            return outcomes
        chunk = max(1, min(32, len(names) // (workers * 8)))
        with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(job,)) as pool:
            outcomes = []
            for outcome in pool.map(process_tile, names, chunksize=chunk):
                outcomes.append(outcome)
                progress.update()
            return outcomes
    finally:
        progress.close()


def tissue_settings(config: NormalizeParams) -> dict[str, Any]:
    """Keyword arguments of :func:`weakseg.stain.tissue_mask` for these parameters."""
    return {
        "min_object_size": config.tissue.min_object_size,
        "min_hole_size": config.tissue.min_hole_size,
        "background_intensity": config.background_intensity,
        "threshold_min": config.tissue.threshold_min,
        "threshold_max": config.tissue.threshold_max,
        "min_green_excess": config.tissue.min_green_excess,
    }


def recorded_settings(config: NormalizeParams) -> dict[str, Any]:
    """What ``stain_reference.json`` records beside the reference, for ``predict`` on new tiles."""
    return {"tissue": tissue_settings(config), "min_tissue_fraction": config.min_tissue_fraction}


def choose_fit_tiles(tiles: list[Tile], count: int, seed: int) -> list[Tile]:
    """A seeded choice of ``count`` train-partition tiles, by name (test tiles are never candidates)."""
    candidates = sorted(partition(tiles, "train"), key=lambda tile: tile.name)
    if not candidates:
        raise UserInputError(f"{RAW / 'annotations.csv'}: no train tiles to fit the stain reference on")
    chosen = np.random.default_rng(seed).choice(len(candidates), size=min(count, len(candidates)), replace=False)
    return [candidates[index] for index in sorted(chosen.tolist())]


def build_reference(config: NormalizeParams, tiles: list[Tile]) -> StainReference | None:
    """The stain reference of ``normalize``: None for method none, else fitted on train tiles or one tile."""
    if config.method == "none":
        return None
    common = {
        "background_intensity": config.background_intensity,
        "alpha": config.alpha,
        "beta": config.beta,
        "min_tissue_fraction": config.min_tissue_fraction,
    }
    if config.reference != "fit":
        path = Path(config.reference)
        if not path.is_file():
            raise UserInputError(f"normalize.reference: {path} is not a file (expected 'fit' or a reference tile)")
        return fit_stain_reference([read_rgb(path)], names=[str(path)], source=str(path), **common)
    chosen = choose_fit_tiles(tiles, config.fit_tiles, config.seed)
    images = [read_rgb(RAW / "images" / tile.name) for tile in chosen]
    return fit_stain_reference(images, names=[tile.name for tile in chosen], source="fit", **common)


def before_after_figure(tiles: list[Tile], config: NormalizeParams, positive_label: str, path: Path) -> None:
    """A few train tiles of each class: raw, normalized, and the tissue mask over the raw tile."""
    rng = np.random.default_rng(config.seed)
    rows, titles = [], []
    train = sorted(partition(tiles, "train"), key=lambda tile: tile.name) or sorted(tiles, key=lambda t: t.name)
    for positive in (True, False):
        members = [tile for tile in train if tile.positive == positive]
        count = min(config.figure_tiles, len(members))
        chosen = sorted(rng.choice(len(members), size=count, replace=False).tolist()) if count else []
        for tile in (members[index] for index in chosen):
            raw = read_rgb(RAW / "images" / tile.name)
            rows.append(
                [
                    raw,
                    read_rgb(NORMALIZED / "images" / tile.name),
                    overlay_mask(raw, read_mask(NORMALIZED / "tissue" / tile.name)),
                ]
            )
            titles.append(f"{tile.label}\n{tile.stem[:22]}")
    if rows:
        save_figure(
            path,
            rows,
            column_titles=["raw", f"normalized ({config.method})", "tissue mask"],
            row_titles=titles,
            title=f"normalize: {config.method}, reference {config.reference} (positive: {positive_label})",
            cell_inches=2.0,
        )


def summarize(outcomes: list[TileOutcome], tiles: list[Tile], config: NormalizeParams) -> dict:
    """The stage's metrics: counts, degenerate tiles, spread of mean optical density, colour separability."""
    density_before = np.stack([outcome.density_before for outcome in outcomes])
    density_after = np.stack([outcome.density_after for outcome in outcomes])
    degenerate = [outcome.name for outcome in outcomes if config.method != "none" and not outcome.normalized]
    metrics: dict = {
        "method": config.method,
        "tiles": len(outcomes),
        "normalized": int(sum(outcome.normalized for outcome in outcomes)),
        "degenerate": {"count": len(degenerate), "fraction": len(degenerate) / len(outcomes), "tiles": degenerate},
        "tissue": {"fraction_mean": float(np.mean([outcome.tissue_fraction for outcome in outcomes]))},
        # Spread across tiles of each tile's mean optical density over its tissue (averaged over R, G, B).
        "optical_density": {
            "mean_std_before": float(density_before.std(axis=0).mean()),
            "mean_std_after": float(density_after.std(axis=0).mean()),
            "mean_before": float(density_before.mean()),
            "mean_after": float(density_after.mean()),
        },
    }
    by_name = {tile.name: tile for tile in tiles}
    train = [index for index, outcome in enumerate(outcomes) if by_name[outcome.name].partition == "train"]
    labels = np.array([by_name[outcomes[index].name].positive for index in train])
    colour: dict = {}
    for key, attribute in (("auc_before", "features_before"), ("auc_after", "features_after")):
        features = np.stack([getattr(outcomes[index], attribute) for index in train]) if train else None
        auc = None if features is None else colour_separability_auc(features, labels, seed=config.seed)
        if auc is not None:
            colour[key] = auc
    if colour:
        metrics["colour_separability"] = colour
    return metrics


def run(params: StageParams) -> None:
    """Fits the reference on train tiles, normalizes every tile, writes masks, metrics and the figure."""
    config: NormalizeParams = params.normalize
    positive_label = params.data.positive_label
    tiles = read_annotations(RAW / "annotations.csv", positive_label)
    names = [tile.name for tile in tiles]
    for name in names:
        if not (RAW / "images" / name).is_file():
            raise UserInputError(f"{RAW / 'images' / name}: listed in annotations.csv but missing")
    reference = build_reference(config, tiles)
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
        outcomes = process_tiles(names, _Job(RAW / "images", staging, reference, config), config.workers)
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
        before_after_figure(tiles, config, positive_label, figures / "before_after.png")
    write_json(METRICS, metrics)
    with stage_run("normalize", params.to_flat_dict()) as tracking:
        tracking.log_metrics(metrics)  # the non-numeric leaves (method, tile names) are left out
        tracking.log_artifact(FIGURES / "before_after.png", "figures")
        tracking.log_artifact(METRICS, "metrics")
        tracking.log_artifact(NORMALIZED / "stain_reference.json", "normalize")


if __name__ == "__main__":
    raise SystemExit(run_stage("normalize", run))
