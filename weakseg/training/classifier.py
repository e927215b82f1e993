"""The tile classifier's training loop: loss, optimizer, schedule, one epoch, selection, the run.

The run is :func:`weakseg.training.engine.fit` with the classifier's own parts: progressive unfreezing
(:mod:`~weakseg.training.unfreezing`), the seeded epoch loaders (:mod:`~weakseg.training.classifier_data`)
and validation on logits (:mod:`~weakseg.training.classifier_validation`). It runs in one process or under
``torch.distributed`` (a :class:`DistributedContext` with more than one process): the model is wrapped in
``DistributedDataParallel``, each epoch's order is the one-process order split over the ranks (so every
global batch is the one-process batch), validation logits are gathered from all ranks before the metrics
are taken (every rank selects the same best epoch), and nothing here writes a file: the stage does every
write, from rank 0.

Epochs are counted from 0. Epoch ``e`` trains the parameter groups :func:`trainable_groups` returns for
``e``, with augmentation seeded by ``seed + e`` and data order drawn from a generator seeded by
``seed + e``, so a run repeats exactly. ``classifier.balance`` counters class imbalance: ``sampler`` makes
each epoch a seeded class-balanced draw (:func:`~weakseg.training.classifier_data.class_balanced_order`),
``weight`` weights the BCE term's positives by negatives / positives (:func:`positive_weight`).

After the last epoch the best weights' decision threshold is chosen on the validation split
(:func:`calibrate_decision`, by ``classifier.decision_rule``) and handed back with them.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from weakseg.distributed import (
    DistributedContext,
    average_buffers,
    gather_batch,
    per_process_batch_size,
    prepare_model,
    wrap_model,
)
from weakseg.errors import UserInputError
from weakseg.losses.classification import ClassificationLoss, positive_weight
from weakseg.metrics import FALLBACK_THRESHOLD, ThresholdCalibration
from weakseg.params import ClassifierParams
from weakseg.training.classifier_data import build_eval_loader, build_train_loader, steps_per_epoch
from weakseg.training.classifier_validation import (
    calibrate_decision,
    distributed_predict_logits,
    majority_class_rate,
    predict_logits,
    validation_scores,
)
from weakseg.training.common import autocast
from weakseg.training.common import build_optimizer as build_common_optimizer
from weakseg.training.datasets import TileDataset
from weakseg.training.engine import DivergenceCheck, EpochOutcome, fit, train_epoch
from weakseg.training.unfreezing import ALL_GROUPS, apply_trainable_groups, set_training_mode, trainable_groups

LOGGER = logging.getLogger(__name__)

#: History columns, in file order (docs/DEVELOPMENT.md).
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_auc", "lr")


class TrainingDivergedError(UserInputError):
    """Raised when the training loss becomes NaN or infinite (usually a learning rate that is too high)."""


# ---------------------------------------------------------------------------------- loss and optimizer
def build_loss(params: ClassifierParams, pos_weight: float | None = None) -> ClassificationLoss:
    """The classifier's loss from its parameters, with the BCE term's ``pos_weight`` if given."""
    return ClassificationLoss(
        params.bce_weight,
        params.focal_tversky_weight,
        params.focal_tversky.alpha,
        params.focal_tversky.beta,
        params.focal_tversky.gamma,
        pos_weight,
    )


def build_optimizer(model: nn.Module, params: ClassifierParams) -> torch.optim.Optimizer:
    """The classifier's optimizer (``classifier.optimizer``: the paper's SGD, or AdamW)."""
    return build_common_optimizer(model, params.optimizer, params.lr, params.momentum, params.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, params: ClassifierParams, steps_per_epoch: int
) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle schedule peaking at ``classifier.lr``, stepped once per batch.

    Momentum is not cycled, so ``classifier.momentum`` is the momentum used.
    """
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=params.lr,
        total_steps=params.epochs * steps_per_epoch,
        cycle_momentum=False,
    )


# ---------------------------------------------------------------------------------------- the loop
def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_function: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    device: torch.device,
    mixed_precision: bool = False,
    description: str = "training",
    context: DistributedContext | None = None,
) -> tuple[float, float]:
    """One pass over ``loader`` with one optimizer (and scheduler) step per batch (:func:`train_epoch`).

    The caller sets the training mode and the trainable groups first. Under a distributed ``context``
    every rank computes the loss of the global batch (:func:`gather_batch`): the Focal Tversky term is
    a set-level loss, so per-rank losses would differ from one process's; and every rank then sees the
    same loss, so all stop together if it diverges.

    Returns:
        ``(mean loss per tile, learning rate of the last step)``.

    Raises:
        TrainingDivergedError: if a batch's loss is not finite.
    """
    non_blocking = device.type == "cuda"
    distributed = context if context is not None and context.enabled else None
    # One progress bar per run, not one per process.
    quiet = distributed is not None and not distributed.is_main
    progress = tqdm(loader, desc=description, leave=False, unit="batch", disable=quiet)

    def batch_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        images, labels = batch
        images = images.to(device, non_blocking=non_blocking)
        labels = labels.to(device, non_blocking=non_blocking)
        with autocast(device, mixed_precision):
            logits = model(images)
        logits = logits.float().reshape(-1)
        if distributed is not None:
            logits, labels = gather_batch(logits, distributed), gather_batch(labels.float(), distributed)
        return loss_function(logits, labels), int(labels.shape[0])

    divergence = DivergenceCheck(
        TrainingDivergedError,
        lambda loss: (
            f"the classifier's training loss became {loss} at learning rate "
            f"{optimizer.param_groups[0]['lr']:.3g}; lower classifier.lr"
        ),
    )
    epoch = train_epoch(progress, batch_loss, optimizer, scheduler, divergence, progress=progress)
    if epoch.tiles == 0:
        raise ValueError("the training loader produced no batch")
    return epoch.loss_sum / epoch.tiles, epoch.last_lr


def is_better(metric: str, candidate: float, best: float | None) -> bool:
    """Whether ``candidate`` beats ``best`` on ``metric`` (lower is better only for ``loss``; ties lose).

    The first epoch (``best`` is None) always counts, so the loop always has a best state. After that a NaN
    never wins, and any number beats a NaN best (a NaN first epoch does not block every later one).
    """
    if best is None:
        return True
    if math.isnan(candidate):
        return False
    if math.isnan(best):
        return True
    return candidate < best if metric == "loss" else candidate > best


def describe_balance(mode: str, labels: np.ndarray, pos_weight: float | None) -> str:
    """One log line saying how ``classifier.balance`` treats the training split."""
    positives = int(np.count_nonzero(labels))
    counts = f"{positives} positive / {labels.size - positives} negative train tiles"
    if mode == "sampler":
        return f"classifier.balance: sampler (each epoch a class-balanced draw of {labels.size} tiles; {counts})"
    if mode == "weight":
        if pos_weight is None:
            return f"classifier.balance: weight, but one class is absent ({counts}): BCE left unweighted"
        return f"classifier.balance: weight (BCE pos_weight {pos_weight:.4g}; {counts})"
    return f"classifier.balance: none ({counts})"


@dataclass
class TrainingResult:
    """What the loop hands back to the stage.

    ``decision`` is the best weights' decision threshold chosen on the validation split (0.5 with a reason
    where none can be chosen; the default only for results built by hand).
    """

    best_state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_scores: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    decision: ThresholdCalibration = field(
        default_factory=lambda: ThresholdCalibration(FALLBACK_THRESHOLD, "not calibrated", {})
    )
    balance: str = "none"
    pos_weight: float | None = None


def train_classifier(
    model: nn.Module,
    train_dataset: TileDataset,
    validation_dataset: TileDataset,
    params: ClassifierParams,
    seed: int,
    device: torch.device,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    context: DistributedContext | None = None,
) -> TrainingResult:
    """Trains ``model`` and returns its best state by ``params.selection_metric`` on validation.

    Under a distributed ``context`` (more than one process) every rank calls this with the same data and
    parameters; ``params.batch_size`` stays the global batch, and every rank returns the same result.

    Args:
        model: a ResNet classifier with a one-logit head (``models.build_classifier``).
        train_dataset: augmented training tiles.
        validation_dataset: validation tiles, without augmentation.
        params: the ``classifier`` section.
        seed: the run's seed (data order and augmentation of epoch ``e`` use ``seed + e``).
        device: where to train.
        on_epoch_end: called with each history row (see :data:`HISTORY_COLUMNS`), e.g. to log it.
        context: the process group position; ``None`` or one process trains here alone.

    Returns:
        The best state dict (on the CPU), its epoch and validation scores, the history rows, and the best
        weights' decision threshold chosen on validation (the model is left holding the best weights).
    """
    distributed = context if context is not None and context.enabled else None
    if distributed is not None:
        per_process_batch_size(params.batch_size, distributed.world_size, "classifier.batch_size")
        model = prepare_model(model, distributed)
    model.to(device)
    # One label per tile, not per crop drawn from it: the counts a user recognises (the ratio is the same).
    train_labels = train_dataset.tile_labels > 0.5
    pos_weight = positive_weight(train_labels) if params.balance == "weight" else None
    LOGGER.info(describe_balance(params.balance, train_labels, pos_weight))
    loss_function = build_loss(params, pos_weight)
    optimizer = build_optimizer(model, params)
    # Global steps: a distributed epoch has as many steps as a one-process epoch (global batches).
    scheduler = build_scheduler(optimizer, params, steps_per_epoch(len(train_dataset), params.batch_size))
    pin_memory = device.type == "cuda"
    validation_loader = build_eval_loader(validation_dataset, params.batch_size, params.num_workers, pin_memory)
    trained_model: nn.Module = model
    wrapped_groups: set[str] | None = None

    def run_epoch(epoch: int) -> EpochOutcome:
        nonlocal trained_model, wrapped_groups
        groups = trainable_groups(epoch, params.unfreeze)
        apply_trainable_groups(model, groups)
        set_training_mode(model, groups)
        if distributed is not None and groups != wrapped_groups:
            # DDP synchronises the parameters that train when it is built: unfreezing needs a new wrapper.
            trained_model, wrapped_groups = wrap_model(model, distributed), set(groups)
        loader = build_train_loader(
            train_dataset,
            params.batch_size,
            seed,
            epoch,
            params.num_workers,
            pin_memory,
            distributed,
            balanced=params.balance == "sampler",
        )
        train_loss, lr = train_one_epoch(
            trained_model,
            loader,
            loss_function,
            optimizer,
            scheduler,
            device,
            params.mixed_precision,
            description=f"epoch {epoch + 1}/{params.epochs}",
            context=distributed,
        )
        if distributed is None:
            logits, labels = predict_logits(model, validation_loader, device, params.mixed_precision)
        else:
            average_buffers(model, distributed)
            logits, labels = distributed_predict_logits(
                model, validation_dataset, params.batch_size, distributed, params.num_workers, params.mixed_precision
            )
        scores = validation_scores(logits, labels, loss_function)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": scores["loss"],
            "val_accuracy": scores["accuracy"],
            "val_balanced_accuracy": scores["balanced_accuracy"],
            "val_auc": scores["auc"],
            "lr": lr,
        }
        LOGGER.info(
            "epoch %d: train loss %.4f, val loss %.4f, accuracy %.3f, balanced %.3f, AUC %.3f (groups: %s)",
            epoch,
            train_loss,
            scores["loss"],
            scores["accuracy"],
            scores["balanced_accuracy"],
            scores["auc"],
            ",".join(sorted(groups)),
        )
        return EpochOutcome(row, scores[params.selection_metric], scores)

    selection = functools.partial(is_better, params.selection_metric)
    fitted = fit(model, range(params.epochs), run_epoch, selection, on_epoch_end)
    # The model leaves the loop with every parameter trainable, as a user of the returned model expects.
    apply_trainable_groups(model, set(ALL_GROUPS))
    # The kept epoch's decision threshold, chosen on validation (every rank alike: same weights, same tiles).
    model.load_state_dict(fitted.best_state_dict)
    decision = calibrate_decision(
        model,
        validation_dataset,
        params.batch_size,
        device,
        params.num_workers,
        distributed,
        rule=params.decision_rule,
    )
    model.eval()
    return TrainingResult(
        fitted.best_state_dict,
        fitted.best_epoch,
        fitted.best_metrics,
        fitted.history,
        decision,
        params.balance,
        pos_weight,
    )


# ------------------------------------------------------------------------------------------- the report
def classifier_metrics(
    result: TrainingResult, params: ClassifierParams, train_tiles: int, validation_labels: list[bool]
) -> dict[str, Any]:
    """The content of ``metrics/classifier.json``: the kept epoch's validation scores and its decision.

    ``validation`` holds the metrics at 0.5 (also stored in the checkpoint), ``decision`` those at the
    decision threshold chosen on validation; ``bce_pos_weight`` is there only with ``balance: weight``
    and both classes present.
    """
    scores = result.best_scores
    metrics: dict[str, Any] = {
        "best_epoch": result.best_epoch,
        "epochs": params.epochs,
        "selection_metric": params.selection_metric,
        "balance": params.balance,
        "train_tiles": train_tiles,
        "validation": {
            "accuracy": scores["accuracy"],
            "balanced_accuracy": scores["balanced_accuracy"],
            "auc": scores["auc"],
            "loss": scores["loss"],
            "sensitivity": scores["sensitivity"],
            "specificity": scores["specificity"],
            "majority_class_rate": majority_class_rate(validation_labels),
            "tiles": len(validation_labels),
            "positive_tiles": int(sum(validation_labels)),
        },
        # The validation metrics at the decision threshold chosen on validation (``validation``: at 0.5).
        "decision": result.decision.record(),
    }
    if result.pos_weight is not None:
        metrics["bce_pos_weight"] = result.pos_weight
    return metrics


def log_summary(logger: logging.Logger, result: TrainingResult, metrics: dict[str, Any]) -> None:
    """Logs the kept epoch's validation scores and its decision threshold (a warning if it fell back to 0.5)."""
    scores = result.best_scores
    logger.info(
        "best epoch %d: validation accuracy %.3f (majority class %.3f), balanced %.3f, AUC %.3f",
        result.best_epoch,
        scores["accuracy"],
        metrics["validation"]["majority_class_rate"],
        scores["balanced_accuracy"],
        scores["auc"],
    )
    decision = result.decision
    (logger.warning if decision.reason else logger.info)(
        "decision threshold %.4f (validation balanced accuracy %.3f, sensitivity %.3f, specificity %.3f)%s",
        decision.threshold,
        decision.metrics["balanced_accuracy"],
        decision.metrics["sensitivity"],
        decision.metrics["specificity"],
        f"; {decision.reason}" if decision.reason else "",
    )
