"""The ``download`` stage: writes ``data/raw`` (MHIST layout) from ``data.source``, and a contact sheet."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from weakseg.data.layout import Tile
from weakseg.data.sources import build_dataset
from weakseg.figures import overlay_mask, save_figure
from weakseg.io import atomic_directory, read_mask, read_rgb
from weakseg.params import StageParams
from weakseg.stage import run_stage
from weakseg.tracking import stage_run

RAW = Path("data/raw")
FIGURES = Path("figures/download")
CONTACT_SHEET_TILES = 3  # per class

LOGGER = logging.getLogger(__name__)


def contact_sheet(root: Path, tiles: list[Tile], has_masks: bool, path: Path, source: str) -> None:
    """A few positive and negative tiles (the first by name), each beside its mask where masks exist."""
    rows = []
    by_name = sorted(tiles, key=lambda tile: tile.name)
    positives = [tile for tile in by_name if tile.positive][:CONTACT_SHEET_TILES]
    negatives = [tile for tile in by_name if not tile.positive][:CONTACT_SHEET_TILES]
    for positive, negative in zip(positives, negatives, strict=False):
        row = []
        for tile in (positive, negative):
            image = read_rgb(root / "images" / tile.name)
            row.append(image)
            if has_masks:
                row.append(overlay_mask(image, read_mask(root / "masks" / tile.name)))
        rows.append(row)
    if has_masks:
        titles = ["positive", "positive + mask", "negative", "negative + mask"]
    else:
        titles = ["positive", "negative"]
    save_figure(path, rows, column_titles=titles, title=f"data.source: {source}", cell_inches=2.2)


def run(params: StageParams) -> None:
    """Builds ``data/raw`` in a temporary folder, validates it, and renames it into place."""
    data = params.data
    with atomic_directory(RAW) as raw:
        tiles, has_masks = build_dataset(data, raw)
        with atomic_directory(FIGURES) as figures:
            contact_sheet(raw, tiles, has_masks, figures / "contact_sheet.png", data.source)
    positives = int(np.sum([tile.positive for tile in tiles]))
    counts = {
        "tiles": len(tiles),
        "positive_tiles": positives,
        "train_tiles": sum(tile.partition == "train" for tile in tiles),
        "test_tiles": sum(tile.partition == "test" for tile in tiles),
        "has_masks": int(has_masks),
    }
    with stage_run("download", params.to_flat_dict()) as tracked:
        tracked.log_metrics(counts)
        tracked.log_artifact(FIGURES / "contact_sheet.png", "figures")
    LOGGER.info(
        "%s: %d tiles (%d %s, %d other; train %d, test %d)%s",
        RAW,
        len(tiles),
        positives,
        data.positive_label,
        len(tiles) - positives,
        sum(tile.partition == "train" for tile in tiles),
        sum(tile.partition == "test" for tile in tiles),
        ", with masks" if has_masks else "",
    )


if __name__ == "__main__":
    raise SystemExit(run_stage("download", run))
