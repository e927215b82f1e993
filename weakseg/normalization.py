"""The ``normalize`` stage's work: the stain reference, per-tile normalization and tissue masks, the summary.

The reference is fitted on seeded-chosen tiles of the train partition only (or on the tile
``normalize.reference`` names). Tiles are processed on a process pool (:mod:`weakseg.parallel`); each
worker reads, normalizes and writes its own tiles, so only small per-tile numbers cross process boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from weakseg.data.layout import Tile, partition
from weakseg.errors import UserInputError
from weakseg.figures import overlay_mask, save_figure
from weakseg.io import read_mask, read_rgb, write_png
from weakseg.parallel import map_in_processes
from weakseg.params import NormalizeParams
from weakseg.stain import StainReference, degenerate_reason, fit_stain_reference, normalize_tile
from weakseg.tissue import colour_features, colour_separability_auc, mean_optical_density, tissue_mask


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
class NormalizeJob:
    """Everything a worker needs besides the tile's name."""

    images: Path
    output: Path
    reference: StainReference | None
    config: NormalizeParams


def tissue_settings(config: NormalizeParams) -> dict[str, Any]:
    """Keyword arguments of :func:`weakseg.tissue.tissue_mask` for these parameters."""
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


def process_tile(name: str, job: NormalizeJob) -> TileOutcome:
    """Reads one raw tile, writes its normalized tile and tissue mask, and measures both versions."""
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


def process_tiles(names: list[str], job: NormalizeJob, workers: int) -> list[TileOutcome]:
    """Processes tiles on ``workers`` processes (0: every core) with a progress bar; results in ``names`` order."""
    return map_in_processes(partial(process_tile, job=job), names, workers, "normalize")


def choose_fit_tiles(tiles: list[Tile], count: int, seed: int, annotations: Path) -> list[Tile]:
    """A seeded choice of ``count`` train-partition tiles, by name (test tiles are never candidates).

    Args:
        tiles: every tile of the dataset.
        count: how many to choose (all train tiles where there are fewer).
        seed: the choice's seed.
        annotations: the file the tiles came from, named in the error.

    Raises:
        UserInputError: if there is no train tile.
    """
    candidates = sorted(partition(tiles, "train"), key=lambda tile: tile.name)
    if not candidates:
        raise UserInputError(f"{annotations}: no train tiles to fit the stain reference on")
    chosen = np.random.default_rng(seed).choice(len(candidates), size=min(count, len(candidates)), replace=False)
    return [candidates[index] for index in sorted(chosen.tolist())]


def build_reference(config: NormalizeParams, tiles: list[Tile], raw: Path) -> StainReference | None:
    """The stain reference of ``normalize``: None for method none, else fitted on train tiles or one tile.

    Args:
        config: the ``normalize`` parameters.
        tiles: every tile of the dataset.
        raw: the raw dataset folder (``images/``, ``annotations.csv``).
    """
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
    chosen = choose_fit_tiles(tiles, config.fit_tiles, config.seed, raw / "annotations.csv")
    images = [read_rgb(raw / "images" / tile.name) for tile in chosen]
    return fit_stain_reference(images, names=[tile.name for tile in chosen], source="fit", **common)


def summarize(outcomes: list[TileOutcome], tiles: list[Tile], config: NormalizeParams) -> dict:
    """``metrics/normalize.json``: counts, degenerate tiles, spread of mean optical density, colour separability."""
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


def before_after_figure(
    tiles: list[Tile], config: NormalizeParams, positive_label: str, raw: Path, normalized: Path, path: Path
) -> None:
    """A few train tiles of each class: raw, normalized, and the tissue mask over the raw tile.

    Args:
        tiles: every tile of the dataset.
        config: the ``normalize`` parameters (``figure_tiles`` per class, ``seed`` of the choice).
        positive_label: the positive class's label, for the title.
        raw: the raw dataset folder (``images/``).
        normalized: the stage's output folder (``images/``, ``tissue/``).
        path: the PNG to write.
    """
    rng = np.random.default_rng(config.seed)
    rows, titles = [], []
    train = sorted(partition(tiles, "train"), key=lambda tile: tile.name) or sorted(tiles, key=lambda t: t.name)
    for positive in (True, False):
        members = [tile for tile in train if tile.positive == positive]
        count = min(config.figure_tiles, len(members))
        chosen = sorted(rng.choice(len(members), size=count, replace=False).tolist()) if count else []
        for tile in (members[index] for index in chosen):
            raw_tile = read_rgb(raw / "images" / tile.name)
            rows.append(
                [
                    raw_tile,
                    read_rgb(normalized / "images" / tile.name),
                    overlay_mask(raw_tile, read_mask(normalized / "tissue" / tile.name)),
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
