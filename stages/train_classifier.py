"""Stage ``train_classifier``: a ResNet tile classifier trained on the ``train`` partition's image labels.

Reads ``data/normalized/images`` and ``data/normalized/annotations.csv`` (only train-partition tiles are
ever decoded), carves a stratified validation split from them, trains, and writes
``models/classifier.pt`` (the best epoch by ``classifier.selection_metric``, with ``decision_threshold``, its
tile decision threshold chosen on the validation split), ``metrics/classifier.json``,
``metrics/classifier_history.csv`` and one MLflow run.

With ``classifier.distributed.processes_per_node > 1`` the stage re-launches itself under PyTorch's
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

from weakseg.data.layout import LayoutError, partition, read_annotations, split_train_validation
from weakseg.io import write_json
from weakseg.models import build_classifier, save_checkpoint
from weakseg.params import ParamsError, StageParams
from weakseg.stage import run_stage
from weakseg.tracking import stage_run
from weakseg.training.augment import build_augmentation
from weakseg.training.classifier import majority_class_rate, train_classifier
from weakseg.training.common import (
    configure_determinism,
    preprocessing_record,
    seed_everything,
    write_history,
)
from weakseg.training.datasets import TileDataset, load_tiles
from weakseg.training.distributed import DistributedContext, run_training_stage

STAGE = "train_classifier"
DATA = Path("data/normalized")
CHECKPOINT = Path("models/classifier.pt")
METRICS = Path("metrics/classifier.json")
HISTORY = Path("metrics/classifier_history.csv")
LOGGER = logging.getLogger(STAGE)


def run(params: StageParams, stage_arguments: Sequence[str] = ()) -> None:
    """Trains the classifier and writes its checkpoint, metrics, history and MLflow run.

    Args:
        params: the stage's validated parameters.
        stage_arguments: the command-line arguments, passed on when the stage re-launches itself in
            ``classifier.distributed.processes_per_node`` processes.
    """
    settings = params.classifier
    run_training_stage(
        f"stages.{STAGE}",
        "classifier",
        settings.distributed.processes_per_node,
        settings.distributed.backend,
        settings.device,
        settings.batch_size,
        stage_arguments,
        functools.partial(_train, params),
    )


def _train(params: StageParams, context: DistributedContext) -> None:
    """The stage's work in one process of the run (the only one, or one rank of several)."""
    settings = params.classifier
    positive_label = params.data.positive_label
    seed_everything(params.seed)
    configure_determinism()

    tiles = read_annotations(DATA / "annotations.csv", positive_label)
    train_partition = partition(tiles, "train")
    if len(train_partition) < 2:
        raise LayoutError(f"{DATA / 'annotations.csv'}: {len(train_partition)} train-partition tile(s); need at least 2")
    try:
        train_tiles, validation_tiles = split_train_validation(
            train_partition, params.split.validation_fraction, params.split.seed
        )
    except ValueError as error:
        raise ParamsError(f"split.validation_fraction={params.split.validation_fraction}: {error}") from None
    negative_labels = sorted({tile.label for tile in tiles if not tile.positive})

    device = context.device
    # The model is built before any tile is decoded, so a weights problem is reported at once.
    model = build_classifier(settings.arch, settings.weights)
    if settings.unfreeze.enabled and settings.weights == "none":
        LOGGER.warning("classifier.unfreeze.enabled with weights 'none': the frozen layers are random, not pretrained")

    # Only train-partition tiles are decoded: the test partition is for `evaluate` alone.
    train_images = load_tiles(DATA / "images", train_tiles, "loading train tiles")
    validation_images = load_tiles(DATA / "images", validation_tiles, "loading validation tiles")
    if train_images.shape[1:] != validation_images.shape[1:]:
        raise LayoutError(
            f"{DATA / 'images'}: train tiles are {train_images.shape[1:3]} and validation tiles "
            f"{validation_images.shape[1:3]}; training needs one tile size"
        )
    height, width = train_images.shape[1:3]
    if height != width:
        raise LayoutError(f"{DATA / 'images'}: tiles are {width}x{height}; the classifier expects square tiles")
    tile_size = int(height)

    train_labels = [tile.positive for tile in train_tiles]
    validation_labels = [tile.positive for tile in validation_tiles]
    train_dataset = TileDataset(train_images, train_labels, augmentation=build_augmentation(settings.augment, params.seed))
    validation_dataset = TileDataset(validation_images, validation_labels)
    LOGGER.info(
        "%d train tiles (%d positive), %d validation tiles (%d positive), %d px, device %s",
        len(train_tiles),
        sum(train_labels),
        len(validation_tiles),
        sum(validation_labels),
        tile_size,
        device,
    )

    # Only rank 0 opens the MLflow run and writes files; the other ranks train and reduce with it.
    tracking = stage_run(STAGE, params.to_flat_dict()) if context.is_main else contextlib.nullcontext(None)
    with tracking as tracker:

        def log_epoch(row: dict[str, Any]) -> None:
            tracker.log_metrics({key: value for key, value in row.items() if key != "epoch"}, step=int(row["epoch"]))

        result = train_classifier(
            model,
            train_dataset,
            validation_dataset,
            settings,
            params.seed,
            device,
            on_epoch_end=log_epoch if tracker is not None else None,
            context=context,
        )
        if tracker is None:
            return
        scores = result.best_scores
        metrics = {
            "best_epoch": result.best_epoch,
            "epochs": settings.epochs,
            "selection_metric": settings.selection_metric,
            "balance": settings.balance,
            "train_tiles": len(train_tiles),
            "validation": {
                "accuracy": scores["accuracy"],
                "balanced_accuracy": scores["balanced_accuracy"],
                "auc": scores["auc"],
                "loss": scores["loss"],
                "sensitivity": scores["sensitivity"],
                "specificity": scores["specificity"],
                "majority_class_rate": majority_class_rate(validation_labels),
                "tiles": len(validation_tiles),
                "positive_tiles": int(sum(validation_labels)),
            },
            # The validation metrics at the decision threshold chosen on validation (``validation``: at 0.5).
            "decision": result.decision.record(),
        }
        if result.pos_weight is not None:
            metrics["bce_pos_weight"] = result.pos_weight
        model.load_state_dict(result.best_state_dict)
        save_checkpoint(
            CHECKPOINT,
            kind="classifier",
            arch=settings.arch,
            model=model,
            preprocessing=preprocessing_record(tile_size),
            positive_label=positive_label,
            negative_label="/".join(negative_labels),
            tile_size=tile_size,
            epoch=result.best_epoch,
            metrics=metrics["validation"],
            decision_threshold=float(result.decision.threshold),
        )
        write_json(METRICS, metrics)
        write_history(HISTORY, result.history)
        tracker.log_metrics(
            {"epoch": result.best_epoch, "validation": metrics["validation"], "decision": metrics["decision"]},
            prefix="best.",
        )
        if result.pos_weight is not None:
            tracker.log_metrics({"bce_pos_weight": result.pos_weight})
        tracker.log_artifact(HISTORY)
        tracker.log_artifact(METRICS)
    LOGGER.info(
        "best epoch %d: validation accuracy %.3f (majority class %.3f), balanced %.3f, AUC %.3f",
        result.best_epoch,
        scores["accuracy"],
        metrics["validation"]["majority_class_rate"],
        scores["balanced_accuracy"],
        scores["auc"],
    )
    decision = result.decision
    (LOGGER.warning if decision.reason else LOGGER.info)(
        "decision threshold %.4f (validation balanced accuracy %.3f, sensitivity %.3f, specificity %.3f)%s",
        decision.threshold,
        decision.metrics["balanced_accuracy"],
        decision.metrics["sensitivity"],
        decision.metrics["specificity"],
        f"; {decision.reason}" if decision.reason else "",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the stage with ``argv`` (``sys.argv[1:]`` by default), which a re-launch passes on."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    return run_stage(STAGE, functools.partial(run, stage_arguments=arguments), argv=arguments)


if __name__ == "__main__":
    raise SystemExit(main())
