"""Stage ``train_classifier``: a ResNet tile classifier trained on the ``train`` partition's image labels.

Reads ``data/normalized/images`` and ``data/normalized/annotations.csv`` (only train-partition tiles are
ever decoded), carves a stratified validation split from them, trains, and writes
``models/classifier.pt`` (the best epoch by ``classifier.selection_metric``, with ``decision_threshold``, its
tile decision threshold chosen on the validation split), ``metrics/classifier.json``,
``metrics/classifier_history.csv`` and one MLflow run.

Several processes (``classifier.distributed.processes_per_node``, or ``torchrun``) train one model together;
rank 0 alone writes (:func:`weakseg.distributed.run_training_stage` says how).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

from weakseg.data.layout import LayoutError, partition, read_annotations, split_train_validation
from weakseg.distributed import DistributedContext, run_training_stage
from weakseg.io import write_json
from weakseg.models import build_classifier, save_checkpoint
from weakseg.params import ParamsError, StageParams
from weakseg.stage import run_relaunchable_stage
from weakseg.tracking import stage_run
from weakseg.training.classifier import classifier_metrics, log_summary, train_classifier
from weakseg.training.classifier_data import load_classifier_datasets
from weakseg.training.common import configure_determinism, preprocessing_record, seed_everything, write_history

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
    run_training_stage(STAGE, "classifier", settings, functools.partial(_train, params), stage_arguments)


def _train(params: StageParams, context: DistributedContext) -> None:
    """The stage's work in one process of the run (the only one, or one rank of several)."""
    settings = params.classifier
    positive_label = params.data.positive_label
    seed_everything(params.seed)
    configure_determinism()

    tiles = read_annotations(DATA / "annotations.csv", positive_label)
    train_partition = partition(tiles, "train")
    if len(train_partition) < 2:
        raise LayoutError(
            f"{DATA / 'annotations.csv'}: {len(train_partition)} train-partition tile(s); need at least 2"
        )
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
    train_dataset, validation_dataset, tile_size = load_classifier_datasets(
        DATA / "images",
        train_tiles,
        validation_tiles,
        settings.augment,
        params.seed,
        settings.crop_size,
        settings.crops_per_tile,
    )
    train_labels = [tile.positive for tile in train_tiles]
    validation_labels = [tile.positive for tile in validation_tiles]
    counts = (len(train_labels), sum(train_labels), len(validation_labels), sum(validation_labels))
    LOGGER.info(
        "%d train tiles (%d positive), %d validation tiles (%d positive), %d px, device %s", *counts, tile_size, device
    )

    # Only rank 0 opens the MLflow run and writes files; the other ranks train and reduce with it.
    tracking = stage_run(STAGE, params.to_flat_dict()) if context.is_main else contextlib.nullcontext(None)
    with tracking as tracker:
        result = train_classifier(
            model,
            train_dataset,
            validation_dataset,
            settings,
            params.seed,
            device,
            on_epoch_end=tracker.log_epoch if tracker is not None else None,
            context=context,
        )
        if tracker is None:
            return
        metrics = classifier_metrics(result, settings, len(train_tiles), validation_labels)
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
        tracker.set_tags({"decision.rule": result.decision.rule})  # what classifier.decision_rule resolved to
        if result.pos_weight is not None:
            tracker.log_metrics({"bce_pos_weight": result.pos_weight})
        tracker.log_artifact(HISTORY)
        tracker.log_artifact(METRICS)
    log_summary(LOGGER, result, metrics)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the stage with ``argv`` (``sys.argv[1:]`` by default), which a re-launch passes on."""
    return run_relaunchable_stage(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
