"""The ``generate_cams`` stage: a CAM heatmap of the positive class per tile, from the trained classifier.

Reads ``models/classifier.pt`` and ``data/normalized/{images,annotations.csv}``; writes
``data/cams/NAME.png``, 8-bit grey heatmaps (0..255 = 0..1) of the tile's size, of where the classifier
sees the positive class (its logit), for:

- every positive train tile (the pseudo-masks are refined from them);
- every test tile, whatever its label: at test time the pipeline does not know the label, so
  ``evaluate`` gates the CAM by the classifier's decision;
- negative train tiles only when ``cam.negative_train_tiles`` asks (their pseudo-masks are empty by their
  label, so their CAMs would cost about two thirds of the stage on MHIST's balance for nothing), except
  the one negative tile that ``refine_masks``'s figure shows.

Started by ``torchrun`` (``torchrun --nproc-per-node=N -m stages.generate_cams``), each process computes
the CAMs of every N-th batch (each GPU its own, on GPUs) and rank 0 gathers and writes them; the batches
and their noise seeds are those of a one-process run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from weakseg.cam import cam_to_uint8, compute_cams
from weakseg.data.layout import Tile, figure_negative_tile, read_annotations
from weakseg.errors import UserInputError
from weakseg.io import atomic_directory, read_rgb, write_png
from weakseg.models import load_checkpoint, model_from_checkpoint
from weakseg.params import StageParams
from weakseg.stage import run_stage
from weakseg.tracking import stage_run
from weakseg.training.common import configure_determinism, seed_everything, select_device
from weakseg.training.distributed import (
    DistributedContext,
    gather_objects,
    init_distributed,
    launched_by_torchrun,
    leaving_process_group,
)

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


def batch_plan(tiles: list[Tile], images_folder: Path, batch_size: int) -> list[list[int]]:
    """The tile indices of each batch :func:`_same_size_batches` would yield, from image headers only.

    Lets every process of a distributed run agree on the batches (and so on each batch's noise seed)
    without decoding the tiles that other processes will handle.
    """
    plan: list[list[int]] = []
    previous_size: tuple[int, int] | None = None
    for index, tile in enumerate(tiles):
        path = images_folder / tile.name
        try:
            with Image.open(path) as image:
                size = image.size
        except (OSError, SyntaxError):
            size = (-1, -1)  # read_rgb names the file when its batch is decoded
        if plan and (size != previous_size or len(plan[-1]) == batch_size):
            plan.append([])
        if not plan:
            plan.append([])
        plan[-1].append(index)
        previous_size = size
    return plan


def tiles_needing_cams(tiles: list[Tile], negative_train_tiles: bool) -> list[Tile]:
    """The tiles whose CAM is computed, in annotation order (see the module docstring)."""
    shown = figure_negative_tile(tiles)
    return [
        tile
        for tile in tiles
        if tile.positive or tile.partition == "test" or negative_train_tiles or tile == shown
    ]


def run(params: StageParams) -> None:
    """Computes and writes the CAM of every tile (sharded over the processes when started by torchrun)."""
    if not launched_by_torchrun():
        _generate(params, None)
        return
    context = init_distributed("auto", params.cam.device)
    if not context.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one process reports
    with leaving_process_group(context):
        _generate(params, context)


def _generate(params: StageParams, context: DistributedContext | None) -> None:
    """The stage's work in one process (``context`` ``None``) or in one rank of several."""
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
    device = select_device(cam_params.device) if context is None else context.device
    tiles = tiles_needing_cams(
        read_annotations(NORMALIZED / "annotations.csv", positive_label), cam_params.negative_train_tiles
    )
    images_folder = NORMALIZED / "images"
    if context is not None and context.enabled:
        _generate_sharded(params, context, model, checkpoint, tiles, images_folder, device)
        return
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
                [True] * len(batch_tiles),  # the positive class's evidence, whatever the label
                method=cam_params.method,
                target_layer=cam_params.target_layer,
                num_samples=cam_params.num_samples,
                std=cam_params.std,
                seed=_batch_seed(params.seed, index),
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


def _batch_seed(seed: int, batch_index: int) -> int:
    """One noise seed per batch, derived from the run's seed, so the noise does not depend on the device."""
    return seed * 1_000_003 + batch_index


def _generate_sharded(
    params: StageParams,
    context: DistributedContext,
    model: torch.nn.Module,
    checkpoint: dict[str, Any],
    tiles: list[Tile],
    images_folder: Path,
    device: torch.device,
) -> None:
    """Batch ``b`` is computed by rank ``b % world_size``; rank 0 gathers each round and writes."""
    cam_params = params.cam
    plan = batch_plan(tiles, images_folder, cam_params.batch_size)
    tracking = stage_run(STAGE, params.to_flat_dict()) if context.is_main else contextlib.nullcontext(None)
    output = atomic_directory(CAMS) if context.is_main else contextlib.nullcontext(None)
    with tracking as tracker, output as folder:
        progress = tqdm(total=len(tiles), desc="CAMs", unit="tile", disable=not context.is_main)
        coverage: list[float] = []
        flat = 0
        # Every rank runs the same number of rounds (and so of gathers), holding a batch or not.
        for round_start in range(0, len(plan), context.world_size):
            batch_index = round_start + context.rank
            computed: list[tuple[str, np.ndarray, float, int]] = []
            if batch_index < len(plan):
                batch_tiles = [tiles[index] for index in plan[batch_index]]
                images = np.stack([read_rgb(images_folder / tile.name) for tile in batch_tiles])
                cams = compute_cams(
                    model,
                    images,
                    [True] * len(batch_tiles),  # the positive class's evidence, whatever the label
                    method=cam_params.method,
                    target_layer=cam_params.target_layer,
                    num_samples=cam_params.num_samples,
                    std=cam_params.std,
                    seed=_batch_seed(params.seed, batch_index),
                    device=device,
                    preprocessing=checkpoint.get("preprocessing"),
                    score_batch_size=cam_params.batch_size,
                )
                # uint8 maps travel (a quarter of float32); the statistics are taken from the floats here.
                computed = [
                    (tile.name, cam_to_uint8(cam), float(cam.mean()), int(cam.max() == 0.0))
                    for tile, cam in zip(batch_tiles, cams, strict=True)
                ]
            shares = gather_objects(computed, context)
            if folder is None:
                continue  # not rank 0: only rank 0 writes and counts
            for share in shares:
                for name, heatmap, mean_activation, is_flat in share:
                    write_png(folder / name, heatmap)
                    coverage.append(mean_activation)
                    flat += is_flat
                progress.update(len(share))
        progress.close()
        if tracker is None:
            return
        if flat:
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
    logger.info(
        "wrote %d CAMs to %s (%s on %d processes)", len(tiles), CAMS, cam_params.method, context.world_size
    )


if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE, run))
