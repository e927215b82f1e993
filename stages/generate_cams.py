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
It also writes ``metrics/cams.json``: the share of a positive tile's tissue that looks normal, measured on
the validation split (``weakseg.normal_tissue``), which ``refine.background_quantile: auto`` uses.

Started by ``torchrun`` (``torchrun --nproc-per-node=N -m stages.generate_cams``), each process computes
the CAMs of every N-th batch (each GPU its own, on GPUs) and rank 0 gathers and writes them; the batches
and their noise seeds are those of a one-process run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from weakseg.cam_batches import (
    CamTally,
    EncodedCam,
    batch_cams,
    batch_plan,
    batch_seed,
    same_size_batches,
    tiles_needing_cams,
    write_normal_tissue_estimate,
)
from weakseg.data.layout import Tile, read_annotations
from weakseg.distributed import DistributedContext, gather_objects, run_distributed_stage, select_device
from weakseg.errors import UserInputError
from weakseg.io import atomic_directory, read_rgb
from weakseg.models import load_checkpoint, model_from_checkpoint
from weakseg.params import StageParams
from weakseg.stage import run_stage
from weakseg.tracking import stage_run
from weakseg.training.common import configure_determinism, seed_everything

STAGE = "generate_cams"
CLASSIFIER = Path("models/classifier.pt")
NORMALIZED = Path("data/normalized")
CAMS = Path("data/cams")
CAM_METRICS = Path("metrics/cams.json")

logger = logging.getLogger(STAGE)


class CamStageError(UserInputError):
    """Raised when the classifier and the data do not fit together."""


def run(params: StageParams) -> None:
    """Computes and writes the CAM of every tile (sharded over the processes when started by torchrun)."""
    # Without device_error, an unavailable cam.device under torchrun stays the RuntimeError it always was.
    run_distributed_stage("cam", params.cam.device, functools.partial(_generate, params), device_error=None)


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
    preprocessing = checkpoint.get("preprocessing")
    device = select_device(cam_params.device) if context is None else context.device
    tiles = tiles_needing_cams(
        read_annotations(NORMALIZED / "annotations.csv", positive_label), cam_params.negative_train_tiles
    )
    images_folder = NORMALIZED / "images"
    if context is not None and context.enabled:
        _generate_sharded(params, context, model, preprocessing, tiles, images_folder, device)
        return
    with stage_run(STAGE, params.to_flat_dict()) as tracker, atomic_directory(CAMS) as folder:
        progress = tqdm(total=len(tiles), desc="CAMs", unit="tile")
        tally = CamTally()
        for index, (batch_tiles, images) in enumerate(same_size_batches(tiles, images_folder, cam_params.batch_size)):
            seed = batch_seed(params.seed, index)
            tally.write(
                folder,
                batch_cams(
                    model, batch_tiles, images, cam_params, seed, device, preprocessing, params.classifier.crop_size
                ),
            )
            progress.update(len(batch_tiles))
        progress.close()
        tracker.log_metrics(tally.report(len(tiles), cam_params.target_layer))
        write_normal_tissue_estimate(model, params, NORMALIZED, CAM_METRICS, device, preprocessing, tracker)
    logger.info("wrote %d CAMs to %s (%s on %s)", len(tiles), CAMS, cam_params.method, device)


def _generate_sharded(
    params: StageParams,
    context: DistributedContext,
    model: torch.nn.Module,
    preprocessing: dict[str, Any] | None,
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
        tally = CamTally()
        # Every rank runs the same number of rounds (and so of gathers), holding a batch or not.
        for round_start in range(0, len(plan), context.world_size):
            batch_index = round_start + context.rank
            computed: list[EncodedCam] = []
            if batch_index < len(plan):
                batch_tiles = [tiles[index] for index in plan[batch_index]]
                images = np.stack([read_rgb(images_folder / tile.name) for tile in batch_tiles])
                seed = batch_seed(params.seed, batch_index)
                computed = batch_cams(
                    model, batch_tiles, images, cam_params, seed, device, preprocessing, params.classifier.crop_size
                )
            shares = gather_objects(computed, context)
            if folder is None:
                continue  # not rank 0: only rank 0 writes and counts
            for share in shares:
                tally.write(folder, share)
                progress.update(len(share))
        progress.close()
        if tracker is None:
            return
        tracker.log_metrics(tally.report(len(tiles), cam_params.target_layer))
        write_normal_tissue_estimate(model, params, NORMALIZED, CAM_METRICS, device, preprocessing, tracker)
    logger.info("wrote %d CAMs to %s (%s on %d processes)", len(tiles), CAMS, cam_params.method, context.world_size)


if __name__ == "__main__":
    raise SystemExit(run_stage(STAGE, run))
