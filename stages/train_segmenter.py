"""Stage ``train_segmenter``: DeepLabv3+ on the refined pseudo-masks of the train partition.

Reads ``data/normalized/images``, ``data/normalized/annotations.csv`` and ``data/pseudo_masks`` (train
partition only; test tiles are never decoded). With ``segmenter.targets: truth`` it reads the true masks
(``data/raw/masks``) instead: the fully supervised reference, never the default. Writes
``models/segmenter.pt``, ``metrics/segmenter.json``, ``metrics/segmenter_history.csv`` and an MLflow run.

With ``segmenter.distributed.processes_per_node > 1`` the stage re-launches itself under PyTorch's
elastic launcher; under ``torchrun`` (that re-launch, or a user's multi-node command) every process trains
its share of each global batch with ``DistributedDataParallel`` and only rank 0 writes files and the
MLflow run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from weakseg.data.layout import partition, read_annotations, split_train_validation
from weakseg.errors import UserInputError
from weakseg.io import write_json
from weakseg.models import build_segmenter, save_checkpoint
from weakseg.params import StageParams
from weakseg.stage import run_stage
from weakseg.tracking import stage_run
from weakseg.training.common import (
    configure_determinism,
    preprocessing_record,
    write_history,
)
from weakseg.training.datasets import load_masks, load_pseudo_masks, load_tiles
from weakseg.training.distributed import DistributedContext, run_training_stage
from weakseg.training.segmenter import SegmenterData, train_segmenter

STAGE = "train_segmenter"
NORMALIZED = Path("data/normalized")
PSEUDO_MASKS = Path("data/pseudo_masks")
TRUE_MASKS = Path("data/raw/masks")
CHECKPOINT = Path("models/segmenter.pt")
METRICS = Path("metrics/segmenter.json")
HISTORY = Path("metrics/segmenter_history.csv")

logger = logging.getLogger(__name__)


class SegmenterInputError(UserInputError):
    """Raised when the segmenter's inputs do not fit together."""


def target_masks_folder(targets: str) -> Path:
    """Where ``segmenter.targets`` takes the training masks from; checked before any training starts.

    Raises:
        SegmenterInputError: ``truth`` on a dataset without pixel truth (``data/raw/masks``).
    """
    if targets == "pseudo":
        return PSEUDO_MASKS
    if not TRUE_MASKS.is_dir():
        raise SegmenterInputError(
            f"segmenter.targets is 'truth', but the dataset has no true masks ({TRUE_MASKS} does not exist); "
            "use segmenter.targets: pseudo"
        )
    return TRUE_MASKS


def _load_split(tiles: list[Any], description: str, masks_folder: Path) -> SegmenterData:
    images = load_tiles(NORMALIZED / "images", tiles, f"loading {description} tiles")
    if masks_folder == PSEUDO_MASKS:
        # 0/1 targets, and 255 where the pseudo-mask's band is ignored (refine.background_quantile).
        masks = load_pseudo_masks(masks_folder, tiles, f"loading {description} pseudo-masks")
    else:
        masks = load_masks(masks_folder, tiles, f"loading {description} true masks")
    for tile, image, mask in zip(tiles, images, masks, strict=True):
        if mask.shape != image.shape[:2]:
            raise SegmenterInputError(
                f"{masks_folder / tile.name}: mask is {mask.shape[1]}x{mask.shape[0]}, "
                f"its tile is {image.shape[1]}x{image.shape[0]}"
            )
    return SegmenterData(images=images, masks=masks, positives=np.array([tile.positive for tile in tiles]))


def run(params: StageParams, stage_arguments: Sequence[str] = ()) -> None:
    """Trains the segmenter and writes its checkpoint, metrics and history.

    Args:
        params: the stage's validated parameters.
        stage_arguments: the command-line arguments, passed on when the stage re-launches itself in
            ``segmenter.distributed.processes_per_node`` processes.
    """
    settings = params.segmenter
    target_masks_folder(settings.targets)  # a dataset without truth fails here, before any process starts
    run_training_stage(
        f"stages.{STAGE}",
        "segmenter",
        settings.distributed.processes_per_node,
        settings.distributed.backend,
        settings.device,
        settings.batch_size,
        stage_arguments,
        functools.partial(_train, params),
    )


def _train(params: StageParams, context: DistributedContext) -> None:
    """The stage's work in one process of the run (the only one, or one rank of several)."""
    segmenter = params.segmenter
    positive_label = params.data.positive_label
    configure_determinism()
    device = context.device
    masks_folder = target_masks_folder(segmenter.targets)

    tiles = read_annotations(NORMALIZED / "annotations.csv", positive_label)
    try:
        train_tiles, validation_tiles = split_train_validation(
            partition(tiles, "train"), params.split.validation_fraction, params.split.seed
        )
    except ValueError as error:
        raise SegmenterInputError(
            f"{NORMALIZED / 'annotations.csv'}: {error} (see split.validation_fraction)"
        ) from None
    if not any(tile.positive for tile in train_tiles):
        raise SegmenterInputError(
            f"{NORMALIZED / 'annotations.csv'}: no {positive_label!r} tile in the training split; "
            f"the segmenter has no pseudo-mask to learn from"
        )
    negative_labels = sorted({tile.label for tile in tiles if not tile.positive})
    train = _load_split(train_tiles, "train", masks_folder)
    validation = _load_split(validation_tiles, "validation", masks_folder)
    tile_size = int(train.images.shape[1])
    if validation.images.shape[1:3] != train.images.shape[1:3]:
        raise SegmenterInputError(
            f"{NORMALIZED / 'images'}: validation tiles are {validation.images.shape[1:3]}, "
            f"train tiles {train.images.shape[1:3]}; training needs one tile size"
        )
    logger.info(
        "training on %d tiles (%d positive), validating on %d, %d px, device %s",
        len(train_tiles), int(train.positives.sum()), len(validation_tiles), tile_size, device,
    )

    # Only rank 0 opens the MLflow run and writes files; the other ranks train and reduce with it.
    tracked = stage_run(STAGE, params.to_flat_dict()) if context.is_main else contextlib.nullcontext(None)
    with tracked as tracking:

        def log_epoch(row: dict[str, Any]) -> None:
            tracking.log_metrics({key: value for key, value in row.items() if key != "epoch"}, step=int(row["epoch"]))

        result = train_segmenter(
            train,
            validation,
            segmenter,
            params.seed,
            device,
            on_epoch=log_epoch if tracking is not None else None,
            context=context,
        )
        if tracking is None:
            return
        metrics: dict[str, Any] = {
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "early_stopped_at_epoch": result.stopped_early_at,
            "train_tiles": len(train_tiles),
            "validation_tiles": len(validation_tiles),
            "tile_size": tile_size,
            "targets": segmenter.targets,
            **result.best_metrics,
            "val_head": result.head.record(),
        }
        best_model = build_segmenter(segmenter.encoder, "none")
        best_model.load_state_dict(result.best_state_dict)
        save_checkpoint(
            CHECKPOINT,
            kind="segmenter",
            arch=segmenter.encoder,
            model=best_model,
            preprocessing=preprocessing_record(tile_size),
            positive_label=positive_label,
            negative_label="/".join(negative_labels),
            tile_size=tile_size,
            epoch=result.best_epoch,
            metrics={key: float(value) for key, value in result.best_metrics.items()},
            head_threshold=float(result.head.threshold),
        )
        write_history(HISTORY, result.history)
        write_json(METRICS, metrics)
        tracking.log_metrics({f"best_{key}": value for key, value in result.best_metrics.items()})
        tracking.log_metrics({"best_epoch": result.best_epoch, "val_head": result.head.record()})
        tracking.log_artifact(HISTORY)
        tracking.log_artifact(METRICS)
    logger.info(
        "best epoch %d: validation IoU %.4f, Dice %.4f (against the %s masks)",
        result.best_epoch, result.best_metrics["val_iou"], result.best_metrics["val_dice"],
        "true" if params.segmenter.targets == "truth" else "pseudo",
    )
    head = result.head
    (logger.warning if head.reason else logger.info)(
        "head tile threshold %.4f (validation AUC %.3f, balanced accuracy %.3f, sensitivity %.3f, "
        "specificity %.3f)%s",
        head.threshold, head.metrics["auc"], head.metrics["balanced_accuracy"], head.metrics["sensitivity"],
        head.metrics["specificity"], f"; {head.reason}" if head.reason else "",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the stage with ``argv`` (``sys.argv[1:]`` by default), which a re-launch passes on."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    return run_stage(STAGE, functools.partial(run, stage_arguments=arguments), argv=arguments)


if __name__ == "__main__":
    raise SystemExit(main())
