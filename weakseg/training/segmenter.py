"""The segmenter's training loop: DeepLabv3+ on pseudo-masks, with the negative-tile curriculum.

Arrays in, a trained state dict and a history out; files are the stage's business. The run is
:func:`weakseg.training.engine.fit` with the segmenter's own parts: the curriculum's batches
(:mod:`~weakseg.training.segmenter_data`), the loss, validation by pooled pixel counts, and the selection
rule (strictly better replaces). The loop runs in one process or under ``torch.distributed``
(``DistributedDataParallel``): the epoch's tiles come from a pure function of ``(epoch, seed)``
(:func:`weakseg.training.curriculum.epoch_indices`), cut into the one-process run's global batches and each
batch split over the ranks (``shard_indices``); validation is reduced to pooled pixel counts and loss sums,
summed over the ranks, so every rank takes the same best-epoch and early-stopping decisions; only the
caller writes, from rank 0.
"""

from __future__ import annotations

import logging
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
from weakseg.losses.segmentation import SegmentationLoss, SegmentationLossWeights
from weakseg.metrics import ThresholdCalibration
from weakseg.models import build_segmenter
from weakseg.params import SegmenterParams
from weakseg.training.augment import build_augmentation
from weakseg.training.common import autocast, build_optimizer, seed_everything, worker_seed
from weakseg.training.curriculum import epoch_indices, negative_probability, shard_indices
from weakseg.training.datasets import TileDataset
from weakseg.training.engine import (
    DivergenceCheck,
    EarlyStopping,
    EpochCallback,
    EpochOutcome,
    fit,
    strictly_higher,
    train_epoch,
)
from weakseg.training.segmenter_data import (
    EpochSeededDataset,
    SegmenterData,
    batch_loader,
    distributed_training_batches,
    training_batches,
)
from weakseg.training.segmenter_validation import calibrate_head, sum_over_ranks, validate


@dataclass
class SegmenterTrainingResult:
    """What a training run produces."""

    best_state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_metrics: dict[str, float]
    head: ThresholdCalibration
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early_at: int | None = None


class SegmenterDivergedError(UserInputError):
    """Raised when the training loss becomes NaN or infinite (usually a learning rate that is too high)."""


def build_scheduler(
    optimizer: torch.optim.Optimizer, params: SegmenterParams, total_steps: int
) -> torch.optim.lr_scheduler.OneCycleLR | None:
    """``segmenter.lr_schedule``: None for a constant ``lr``, or a one-cycle schedule peaking at ``lr``.

    One-cycle warms up over the first 30 % of the steps and anneals towards 0, stepped once per batch;
    momentum is not cycled (as in the classifier).
    """
    if params.lr_schedule == "constant" or total_steps <= 0:
        return None
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=params.lr, total_steps=total_steps, cycle_momentum=False
    )


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_function: SegmentationLoss,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    grad_clip_norm: float,
    mixed_precision: bool,
    description: str = "training",
    context: DistributedContext | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One pass over ``loader`` (:func:`train_epoch`); returns the tile-weighted mean training loss.

    ``scheduler``, when given, is stepped once per batch, after the optimizer.

    Under a distributed ``context`` every rank computes the loss of the global batch
    (:func:`gather_batch`): Dice and Lovasz are set-level losses, so per-rank losses would differ from
    one process's; and every rank then sees the same loss, so all stop together if it diverges.

    Raises:
        SegmenterDivergedError: if a batch's loss is not finite.
    """
    model.train()
    distributed = context if context is not None and context.enabled else None
    quiet = distributed is not None and not distributed.is_main  # one progress bar per run

    def batch_loss(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        images, labels, masks = batch
        images, labels, masks = images.to(device), labels.to(device), masks.to(device)
        with autocast(device, mixed_precision):
            mask_logits, label_logits = model(images)
        # The losses run in float32 whatever the forward pass ran in (Lovasz sorts, Dice sums).
        mask_logits, label_logits = mask_logits.float(), label_logits.float()
        if distributed is not None:
            mask_logits, label_logits, masks, labels = (
                gather_batch(tensor, distributed) for tensor in (mask_logits, label_logits, masks, labels)
            )
        # len(masks): the global batch under DDP, whose loss every rank holds.
        return loss_function(mask_logits, label_logits, masks, labels), len(masks)

    divergence = DivergenceCheck(
        SegmenterDivergedError,
        lambda loss: (
            f"{description}: the segmenter's loss is {loss}; lower segmenter.lr or set segmenter.grad_clip_norm"
        ),
    )
    batches = tqdm(loader, desc=description, leave=False, disable=quiet)
    epoch = train_epoch(
        batches, batch_loss, optimizer, scheduler, divergence, clip_model=model, grad_clip_norm=grad_clip_norm
    )
    return epoch.loss_sum / epoch.tiles if epoch.tiles else 0.0


def train_segmenter(
    train: SegmenterData,
    validation: SegmenterData,
    params: SegmenterParams,
    seed: int,
    device: torch.device,
    on_epoch: EpochCallback | None = None,
    context: DistributedContext | None = None,
) -> SegmenterTrainingResult:
    """Trains DeepLabv3+ with the curriculum and keeps the epoch of best validation IoU.

    Model selection (``params.selection_metric``): the foreground IoU at 0.5 pooled over every validation
    pixel (negative tiles included), or the validation loss, for targets that mark no validation pixel
    foreground (positive tiles all ignored, the tile-label terms doing the work); a later epoch replaces
    the best only if it is strictly better. Early stopping ends
    the run after ``early_stopping_patience`` epochs without improvement, but never during the
    positive-only epochs, whose models have not yet seen a negative tile.

    Args:
        train: the tiles to train on.
        validation: the tiles to select the model on.
        params: the ``segmenter`` section.
        seed: the run's seed (weights, curriculum draw, augmentation).
        device: where to train.
        on_epoch: called with each history row as it is made (for live logging).
        context: the process group position; ``None`` or one process trains here alone. Every rank calls
            this with the same data and parameters; ``params.batch_size`` stays the global batch, and
            every rank returns the same result.

    Returns:
        The best weights (on the CPU), their epoch and metrics, the per-epoch history, the epoch at
        which early stopping ended the run, if it did, and the best weights' head threshold chosen on
        the validation split (:func:`calibrate_head`).

    Raises:
        ValueError: if the training split has no positive tile or the validation split is empty.
        DistributedBatchError: if the batch size is not a multiple of the number of processes.
    """
    if not train.positives.any():
        raise ValueError("the training split has no positive tile; the segmenter has nothing to learn")
    if len(validation.images) == 0:
        raise ValueError("the validation split is empty")
    distributed = context if context is not None and context.enabled else None
    local_batch_size = params.batch_size
    if distributed is not None:
        local_batch_size = per_process_batch_size(params.batch_size, distributed.world_size, "segmenter.batch_size")
    seed_everything(seed)
    model: nn.Module = build_segmenter(params.encoder, params.weights).to(device)
    trained_model = model
    if distributed is not None:
        model = prepare_model(model, distributed).to(device)
        trained_model = wrap_model(model, distributed)
        # Same initial weights on every rank (seeded above, then broadcast by DDP), but each rank draws its
        # own dropout masks: seeded alike, every rank would drop the same channels of its tiles.
        torch.manual_seed(worker_seed(seed, 1_000 + distributed.rank))
    optimizer = build_optimizer(model, params.optimizer, params.lr, params.momentum, params.weight_decay)
    loss_function = SegmentationLoss(SegmentationLossWeights(**params.loss.model_dump()))
    augmentation = build_augmentation(params.augment, seed)
    train_dataset = EpochSeededDataset(train.images, train.positives, train.masks, augmentation)
    validation_dataset = TileDataset(validation.images, validation.positives, validation.masks, None)
    validation_order = np.arange(len(validation_dataset))
    if distributed is not None:
        # Each rank scores its strided share; the pixel counts and loss sums are added up afterwards.
        validation_order = shard_indices(validation_order, distributed.rank, distributed.world_size)
    validation_batches = [
        validation_order[start : start + local_batch_size].tolist()
        for start in range(0, len(validation_order), local_batch_size)
    ]
    validation_loader = batch_loader(validation_dataset, validation_batches, params.num_workers)

    # Every epoch's batches are a pure function of (seed, epoch), so the schedule knows its length up front.
    epoch_batches: list[list[list[int]]] = []
    for epoch in range(1, params.epochs + 1):
        indices = epoch_indices(train.positives, epoch, params.epochs, params.curriculum, seed)
        if distributed is None:
            epoch_batches.append(training_batches(indices, params.batch_size))
        else:
            epoch_batches.append(
                distributed_training_batches(indices, params.batch_size, distributed.rank, distributed.world_size)
            )
    scheduler = build_scheduler(optimizer, params, sum(len(batches) for batches in epoch_batches))

    def run_epoch(epoch: int) -> EpochOutcome:
        probability = negative_probability(epoch, params.epochs, params.curriculum)
        batches = epoch_batches[epoch - 1]
        if distributed is None:
            train_dataset.start_epoch(worker_seed(seed, epoch))
        else:
            # Ranks must not share one augmentation stream, or their tiles would be transformed alike.
            train_dataset.start_epoch(worker_seed(worker_seed(seed, epoch), 1_000 + distributed.rank))
        loader = batch_loader(train_dataset, batches, params.num_workers)
        train_loss = train_one_epoch(
            trained_model,
            loader,
            loss_function,
            optimizer,
            device,
            params.grad_clip_norm,
            params.mixed_precision,
            description=f"epoch {epoch}/{params.epochs}",
            context=distributed,
            scheduler=scheduler,
        )
        if distributed is not None:
            average_buffers(model, distributed)
        # The bare model, not the DDP wrapper: ranks may score different numbers of validation batches.
        result = validate(model, validation_loader, loss_function, device, params.mixed_precision)
        if distributed is not None:
            result = sum_over_ranks(result, distributed)
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": result.loss,
            "val_iou": result.counts.iou,
            "val_dice": result.counts.dice,
            "negative_probability": probability,
            "lr": float(optimizer.param_groups[0]["lr"]),
        }
        # Higher is better for both: IoU, or the negated validation loss (targets without any foreground).
        selection_score = result.counts.iou if params.selection_metric == "iou" else -result.loss
        metrics = {
            "val_iou": result.counts.iou,
            "val_dice": result.counts.dice,
            "val_miou": result.counts.miou,
            "val_loss": result.loss,
        }
        return EpochOutcome(row, selection_score, metrics)

    # Early stopping waits out the positive-only epochs, whose models have not yet seen a negative tile.
    early_stopping = EarlyStopping(params.early_stopping_patience, params.curriculum.positive_only_epochs)
    fitted = fit(model, range(1, params.epochs + 1), run_epoch, strictly_higher, on_epoch, early_stopping)
    # The kept epoch's head, thresholded on validation (every rank alike: same weights, same tiles).
    model.load_state_dict(fitted.best_state_dict)
    head = calibrate_head(model, validation, local_batch_size, device, params.decision_rule)
    return SegmenterTrainingResult(
        best_state_dict=fitted.best_state_dict,
        best_epoch=fitted.best_epoch,
        best_metrics=fitted.best_metrics,
        history=fitted.history,
        stopped_early_at=fitted.stopped_early_at,
        head=head,
    )


# ------------------------------------------------------------------------------------------- the report
def segmenter_metrics(
    result: SegmenterTrainingResult, params: SegmenterParams, train_tiles: int, validation_tiles: int, tile_size: int
) -> dict[str, Any]:
    """The content of ``metrics/segmenter.json``: the run's length, the kept epoch's metrics, the head's threshold."""
    return {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "early_stopped_at_epoch": result.stopped_early_at,
        "train_tiles": train_tiles,
        "validation_tiles": validation_tiles,
        "tile_size": tile_size,
        "targets": params.targets,
        **result.best_metrics,
        "val_head": result.head.record(),
    }


def log_summary(logger: logging.Logger, result: SegmenterTrainingResult, targets: str) -> None:
    """Logs the kept epoch's validation IoU and Dice and the head's threshold (a warning if it fell back to 0.5)."""
    logger.info(
        "best epoch %d: validation IoU %.4f, Dice %.4f (against the %s masks)",
        result.best_epoch,
        result.best_metrics["val_iou"],
        result.best_metrics["val_dice"],
        "true" if targets == "truth" else "pseudo",
    )
    head = result.head
    (logger.warning if head.reason else logger.info)(
        "head tile threshold %.4f (validation AUC %.3f, balanced accuracy %.3f, sensitivity %.3f, specificity %.3f)%s",
        head.threshold,
        head.metrics["auc"],
        head.metrics["balanced_accuracy"],
        head.metrics["sensitivity"],
        head.metrics["specificity"],
        f"; {head.reason}" if head.reason else "",
    )
