"""Stage ``train_segmenter``: DeepLabv3+ on the refined pseudo-masks of the train partition.

Reads ``data/normalized/images``, ``data/normalized/annotations.csv`` and ``data/pseudo_masks`` (train
partition only; test tiles are never decoded). With ``segmenter.targets: truth`` it reads the true masks
(``data/raw/masks``) instead: the fully supervised reference, never the default. Writes
``models/segmenter.pt``, ``metrics/segmenter.json``, ``metrics/segmenter_history.csv`` and an MLflow run.

Several processes (``segmenter.distributed.processes_per_node``, or ``torchrun``) train one model together;
rank 0 alone writes (:func:`weakseg.distributed.run_training_stage` says how).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

from weakseg.data.layout import read_annotations
from weakseg.distributed import DistributedContext, run_training_stage
from weakseg.io import write_json
from weakseg.models import build_segmenter, save_checkpoint
from weakseg.params import StageParams
from weakseg.stage import run_relaunchable_stage
from weakseg.tracking import stage_run
from weakseg.training.common import configure_determinism, preprocessing_record, write_history
from weakseg.training.segmenter import log_summary, segmenter_metrics, train_segmenter
from weakseg.training.segmenter_data import SegmenterInputError, load_segmenter_splits, segmenter_splits

STAGE = "train_segmenter"
NORMALIZED = Path("data/normalized")
PSEUDO_MASKS = Path("data/pseudo_masks")
TRUE_MASKS = Path("data/raw/masks")
CHECKPOINT = Path("models/segmenter.pt")
METRICS = Path("metrics/segmenter.json")
HISTORY = Path("metrics/segmenter_history.csv")

logger = logging.getLogger(__name__)


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


def run(params: StageParams, stage_arguments: Sequence[str] = ()) -> None:
    """Trains the segmenter and writes its checkpoint, metrics and history.

    Args:
        params: the stage's validated parameters.
        stage_arguments: the command-line arguments, passed on when the stage re-launches itself in
            ``segmenter.distributed.processes_per_node`` processes.
    """
    settings = params.segmenter
    target_masks_folder(settings.targets)  # a dataset without truth fails here, before any process starts
    run_training_stage(STAGE, "segmenter", settings, functools.partial(_train, params), stage_arguments)


def _train(params: StageParams, context: DistributedContext) -> None:
    """The stage's work in one process of the run (the only one, or one rank of several)."""
    segmenter = params.segmenter
    positive_label = params.data.positive_label
    configure_determinism()
    device = context.device
    masks_folder = target_masks_folder(segmenter.targets)

    tiles = read_annotations(NORMALIZED / "annotations.csv", positive_label)
    train_tiles, validation_tiles = segmenter_splits(
        tiles, params.split.validation_fraction, params.split.seed, NORMALIZED / "annotations.csv", positive_label
    )
    negative_labels = sorted({tile.label for tile in tiles if not tile.positive})
    train, validation, tile_size = load_segmenter_splits(
        NORMALIZED / "images", masks_folder, train_tiles, validation_tiles, masks_folder == PSEUDO_MASKS
    )
    counts = (len(train_tiles), int(train.positives.sum()), len(validation_tiles))
    logger.info("training on %d tiles (%d positive), validating on %d, %d px, device %s", *counts, tile_size, device)

    # Only rank 0 opens the MLflow run and writes files; the other ranks train and reduce with it.
    tracked = stage_run(STAGE, params.to_flat_dict()) if context.is_main else contextlib.nullcontext(None)
    with tracked as tracking:
        result = train_segmenter(
            train,
            validation,
            segmenter,
            params.seed,
            device,
            on_epoch=tracking.log_epoch if tracking is not None else None,
            context=context,
        )
        if tracking is None:
            return
        metrics = segmenter_metrics(result, segmenter, len(train_tiles), len(validation_tiles), tile_size)
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
        tracking.set_tags({"val_head.rule": result.head.rule})  # what segmenter.decision_rule resolved to
        tracking.log_artifact(HISTORY)
        tracking.log_artifact(METRICS)
    log_summary(logger, result, params.segmenter.targets)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the stage with ``argv`` (``sys.argv[1:]`` by default), which a re-launch passes on."""
    return run_relaunchable_stage(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
