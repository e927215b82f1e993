"""The ``generate_cams`` stage: a CAM heatmap per tile (both partitions) from the trained classifier.

Reads ``models/classifier.pt`` and ``data/normalized/{images,annotations.csv}``; writes
``data/cams/NAME.png``, 8-bit grey heatmaps (0..255 = 0..1) of the tile's size, for the tile's
ground-truth class (the logit for positive tiles, the negated logit for negative ones).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from weakseg.cam import cam_to_uint8, compute_cams
from weakseg.data.layout import Tile, read_annotations
from weakseg.errors import UserInputError
from weakseg.io import atomic_directory, read_rgb, write_png
from weakseg.models import load_checkpoint, model_from_checkpoint
from weakseg.params import StageParams
from weakseg.stage import run_stage
from weakseg.tracking import stage_run
from weakseg.training.common import configure_determinism, seed_everything, select_device

STAGE = "generate_cams"
CLASSIFIER = Path("models/classifier.pt")
NORMALIZED = Path("data/normalized")
CAMS = Path("data/cams")

logger = logging.getLogger(STAGE)


class CamStageError(UserInputError):
    """Raised when the classifier and the data do not fit together."""


def _same_size_batches(
    tiles: list[Tile], images_folder: Path, batch_size: int
) -> Iterator[tuple[list[Tile], np.ndarray]]:
    """Yields ``(tiles, images)`` batches of consecutive tiles that share one size."""
    batch_tiles: list[Tile] = []
    batch_images: list[np.ndarray] = []
    for tile in tiles:
        image = read_rgb(images_folder / tile.name)
        if batch_images and (image.shape != batch_images[0].shape or len(batch_images) == batch_size):
            yield batch_tiles, np.stack(batch_images)
            batch_tiles, batch_images = [], []
        batch_tiles.append(tile)
        batch_images.append(image)
    if batch_images:
        yield batch_tiles, np.stack(batch_images)


def run(params: StageParams) -> None:
    """Computes and writes the CAM of every tile."""
    cam_params = params.cam
    positive_label = params.data.positive_label
    seed_everything(params.seed)
    configure_determinism()
    checkpoint = load_checkpoint(CLASSIFIER, kind="classifier")
    trained_label = checkpoint.get("positive_label")
    if trained_label is not None and trained_label != positive_label:
        raise CamStageError(
            f"{CLASSIFIER}: trained with positive label {trained_label!r}, but data.positive_label is "
            f"{positive_label!r}; re-run train_classifier"
        )
    model = model_from_checkpoint(checkpoint)
    device = select_device(cam_params.device)
    tiles = read_annotations(NORMALIZED / "annotations.csv", positive_label)
    images_folder = NORMALIZED / "images"
    with stage_run(STAGE, params.to_flat_dict()) as tracker, atomic_directory(CAMS) as folder:
        progress = tqdm(total=len(tiles), desc="CAMs", unit="tile")
        coverage: list[float] = []
        flat = 0
        for index, (batch_tiles, images) in enumerate(
            _same_size_batches(tiles, images_folder, cam_params.batch_size)
        ):
            cams = compute_cams(
                model,
                images,
                [tile.positive for tile in batch_tiles],
                method=cam_params.method,
                target_layer=cam_params.target_layer,
                num_samples=cam_params.num_samples,
                std=cam_params.std,
                # One seed per batch, derived from the run's seed, so the noise does not depend on the device.
                seed=params.seed * 1_000_003 + index,
                device=device,
                preprocessing=checkpoint.get("preprocessing"),
                score_batch_size=cam_params.batch_size,
            )
            for tile, cam in zip(batch_tiles, cams, strict=True):
                write_png(folder / tile.name, cam_to_uint8(cam))
                coverage.append(float(cam.mean()))
                flat += int(cam.max() == 0.0)
            progress.update(len(batch_tiles))
        progress.close()
        if flat:
            # A flat CAM thresholds to an empty pseudo-mask; usually the tile is too small for the layer.
            logger.warning(
                "%d of %d CAMs are flat (no activation for the class); if tiles are small, %s may be 1x1 "
                "there: use larger tiles or an earlier cam.target_layer",
                flat,
                len(tiles),
                cam_params.target_layer,
            )
        tracker.log_metrics(
            {"cam.tiles": len(tiles), "cam.flat_tiles": flat, "cam.mean_activation": float(np.mean(coverage))}
        )
    logger.info("wrote %d CAMs to %s (%s on %s)", len(tiles), CAMS, cam_params.method, device)


if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE, run))
