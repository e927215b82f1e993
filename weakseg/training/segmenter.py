"""The segmenter's training loop: DeepLabv3+ on pseudo-masks, with the negative-tile curriculum.

Arrays in, a trained state dict and a history out; files are the stage's business. The loop runs in one
process or under ``torch.distributed`` (``DistributedDataParallel``): the epoch's tiles come from a pure
function of ``(epoch, seed)`` (:func:`weakseg.training.curriculum.epoch_indices`), cut into the
one-process run's global batches and each batch split over the ranks (``shard_indices``); validation is
reduced to pooled pixel counts and loss sums, summed over the ranks, so every rank takes the same
best-epoch and early-stopping decisions; only the caller writes, from rank 0.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, get_worker_info
from tqdm import tqdm

from weakseg.errors import UserInputError
from weakseg.losses.segmentation import IGNORE_INDEX, SegmentationLoss, SegmentationLossWeights
from weakseg.metrics import PixelCounts, ThresholdCalibration, calibrate_threshold
from weakseg.models import build_segmenter
from weakseg.params import SegmenterParams
from weakseg.training.augment import build_augmentation
from weakseg.training.common import autocast, build_optimizer, images_to_tensor, seed_everything, worker_seed
from weakseg.training.curriculum import epoch_indices, negative_probability, shard_indices
from weakseg.training.datasets import TileDataset
from weakseg.training.distributed import (
    DistributedContext,
    all_reduce_sum,
    average_buffers,
    gather_batch,
    per_process_batch_size,
    prepare_model,
    wrap_model,
)

PREDICTION_THRESHOLD = 0.5


@dataclass
class SegmenterData:
    """One split in memory: uint8 tiles ``(N, H, W, 3)``, masks ``(N, H, W)``, tile labels ``(N,)``.

    Masks are boolean, or uint8 with 0 background, 1 foreground and ``IGNORE_INDEX`` (255) for pixels the
    loss and the validation counts skip (the pseudo-masks' uncertain band).
    """

    images: np.ndarray
    masks: np.ndarray
    positives: np.ndarray

    def __post_init__(self) -> None:
        self.positives = np.asarray(self.positives, dtype=bool)
        if not (len(self.images) == len(self.masks) == len(self.positives)):
            raise ValueError(
                f"images ({len(self.images)}), masks ({len(self.masks)}) and labels ({len(self.positives)}) "
                f"must have one entry per tile"
            )
        if len(self.images) and self.images.shape[1:3] != self.masks.shape[1:3]:
            raise ValueError(f"tiles are {self.images.shape[1:3]} but masks are {self.masks.shape[1:3]}")


@dataclass
class ValidationResult:
    """Validation reduced to sums, so processes can add theirs before the ratios are taken."""

    counts: PixelCounts
    loss_sum: float
    tiles: int

    @property
    def loss(self) -> float:
        """Mean loss per validation tile (each batch weighted by its size)."""
        return self.loss_sum / self.tiles if self.tiles else 0.0


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


EpochCallback = Callable[[dict[str, Any]], None]


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


def _seed_worker_augmentation(worker_id: int) -> None:
    """Gives each loader worker its own augmentation stream, derived from the epoch's seed."""
    info = get_worker_info()
    if info is None:
        return
    dataset = info.dataset
    dataset.set_augmentation_seed(worker_seed(dataset.epoch_seed, worker_id))  # type: ignore[attr-defined]


class _EpochSeededDataset(TileDataset):
    """A :class:`TileDataset` that remembers the epoch's augmentation seed for its loader workers."""

    epoch_seed: int = 0

    def start_epoch(self, seed: int) -> None:
        """Re-seeds augmentation for one epoch (in this process and, via the seed, in workers)."""
        self.epoch_seed = seed
        self.set_augmentation_seed(seed)


def training_batches(indices: np.ndarray, batch_size: int) -> list[list[int]]:
    """Splits an epoch's indices into batches, folding a trailing single tile into the previous batch.

    A batch of one cannot train: DeepLabv3+'s image-pooling branch normalises a ``1 x 1`` map with
    BatchNorm, which needs more than one value per channel.
    """
    batches = [indices[start : start + batch_size].tolist() for start in range(0, len(indices), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2].extend(batches.pop())
    if batches and len(batches[-1]) == 1:
        return []
    return batches


def distributed_training_batches(
    indices: np.ndarray, batch_size: int, rank: int, world_size: int
) -> list[list[int]]:
    """This rank's batches of an epoch: each one-process batch (:func:`training_batches`) split by rank.

    Every rank gets the same number of batches, and step ``s`` of all ranks together is the one-process
    batch ``s``, except that a last batch too small to give each rank a tile is folded into the batch
    before it (a rank without a tile could not take part in the step).

    Args:
        indices: the epoch's tiles in order (:func:`weakseg.training.curriculum.epoch_indices`).
        batch_size: the global batch.
        rank: this process, ``0 .. world_size - 1``.
        world_size: the number of processes.
    """
    batches = training_batches(indices, batch_size)
    while len(batches) > 1 and len(batches[-1]) < world_size:
        batches[-2].extend(batches.pop())
    if batches and len(batches[-1]) < world_size:
        return []  # too few tiles this epoch to give every rank one
    return [shard_indices(np.asarray(batch), rank, world_size).tolist() for batch in batches]


def batch_loader(dataset: TileDataset, batches: Sequence[Sequence[int]], num_workers: int) -> DataLoader:
    """A loader that yields exactly ``batches`` (lists of dataset indices), in order."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        worker_init_fn=_seed_worker_augmentation if num_workers > 0 else None,
        persistent_workers=False,
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
    """One pass over ``loader``; returns the tile-weighted mean training loss.

    ``scheduler``, when given, is stepped once per batch, after the optimizer.

    Under a distributed ``context`` every rank computes the loss of the global batch
    (:func:`gather_batch`): Dice and Lovasz are set-level losses, so per-rank losses would differ from
    one process's; and every rank then sees the same loss, so all stop together if it diverges.

    Raises:
        SegmenterDivergedError: if a batch's loss is not finite.
    """
    model.train()
    loss_sum, tiles = 0.0, 0
    distributed = context if context is not None and context.enabled else None
    quiet = distributed is not None and not distributed.is_main  # one progress bar per run
    for images, labels, masks in tqdm(loader, desc=description, leave=False, disable=quiet):
        images, labels, masks = images.to(device), labels.to(device), masks.to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, mixed_precision):
            mask_logits, label_logits = model(images)
        # The losses run in float32 whatever the forward pass ran in (Lovasz sorts, Dice sums).
        mask_logits, label_logits = mask_logits.float(), label_logits.float()
        if distributed is not None:
            mask_logits, label_logits, masks, labels = (
                gather_batch(tensor, distributed) for tensor in (mask_logits, label_logits, masks, labels)
            )
        loss = loss_function(mask_logits, label_logits, masks, labels)
        if not torch.isfinite(loss):
            raise SegmenterDivergedError(
                f"{description}: the segmenter's loss is {loss.item()}; "
                f"lower segmenter.lr or set segmenter.grad_clip_norm"
            )
        loss.backward()
        if grad_clip_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        # len(masks): the global batch under DDP, whose loss every rank holds.
        loss_sum += float(loss.detach()) * len(masks)
        tiles += len(masks)
    return loss_sum / tiles if tiles else 0.0


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    loss_function: SegmentationLoss,
    device: torch.device,
    mixed_precision: bool,
    threshold: float = PREDICTION_THRESHOLD,
) -> ValidationResult:
    """Pooled pixel counts at ``threshold`` (negatives included) and the summed loss over ``loader``.

    Pixels whose target is ``IGNORE_INDEX`` count in neither the loss nor the pixel counts.
    """
    model.eval()
    counts = PixelCounts()
    loss_sum, tiles = 0.0, 0
    for images, labels, masks in tqdm(loader, desc="validating", leave=False):
        images, labels, masks = images.to(device), labels.to(device), masks.to(device)
        with autocast(device, mixed_precision):
            mask_logits, label_logits = model(images)
        # The losses run in float32 whatever the forward pass ran in (Lovasz sorts, Dice sums).
        mask_logits, label_logits = mask_logits.float(), label_logits.float()
        loss_sum += float(loss_function(mask_logits, label_logits, masks, labels)) * len(images)
        tiles += len(images)
        predicted = (torch.sigmoid(mask_logits.float()) >= threshold).cpu().numpy()
        targets = masks.cpu().numpy()
        counts.add(predicted, targets == 1, where=targets != IGNORE_INDEX)
    return ValidationResult(counts=counts, loss_sum=loss_sum, tiles=tiles)


@torch.no_grad()
def head_probabilities(model: nn.Module, images: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """The classification head's probabilities ``(N,)`` of uint8 tiles ``(N, H, W, 3)``, in eval mode.

    In float32 without autocast: the numbers ``evaluate`` and ``predict`` compute from the saved checkpoint.
    """
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        _, label_logits = model(images_to_tensor(images[start : start + batch_size]).to(device))
        outputs.append(torch.sigmoid(label_logits.float()).reshape(-1).cpu())
    return torch.cat(outputs).numpy().astype(np.float64) if outputs else np.zeros(0, dtype=np.float64)


def calibrate_head(
    model: nn.Module, validation: SegmenterData, batch_size: int, device: torch.device
) -> ThresholdCalibration:
    """Chooses the head's tile threshold on ``validation`` (highest balanced accuracy) and scores it there.

    The head learns from BCE on a curriculum that shows negative tiles late and rarely, so its
    probabilities are not calibrated: 0.5 can call every tile positive while the ranking is perfect.
    :func:`weakseg.metrics.choose_balanced_accuracy_threshold` states the rule, the tie rule and when
    0.5 is kept (e.g. a validation split of one class).
    """
    scores = head_probabilities(model, validation.images, batch_size, device)
    return calibrate_threshold(validation.positives, scores)


def sum_over_ranks(result: ValidationResult, context: DistributedContext) -> ValidationResult:
    """The validation sums of all ranks added up (the same result on every rank)."""
    if not context.enabled:
        return result
    counts = result.counts
    integers = torch.tensor(
        [counts.true_positive, counts.false_positive, counts.false_negative, counts.true_negative, result.tiles],
        dtype=torch.int64,
    )
    integers = all_reduce_sum(integers, context).tolist()
    loss_sum = float(all_reduce_sum(torch.tensor([result.loss_sum], dtype=torch.float64), context)[0])
    return ValidationResult(
        counts=PixelCounts(
            true_positive=integers[0], false_positive=integers[1], false_negative=integers[2], true_negative=integers[3]
        ),
        loss_sum=loss_sum,
        tiles=integers[4],
    )


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
    model = build_segmenter(params.encoder, params.weights).to(device)
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
    train_dataset = _EpochSeededDataset(train.images, train.positives, train.masks, augmentation)
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

    best_score = -math.inf
    best_epoch = 0
    best_metrics: dict[str, float] = {}
    best_state: dict[str, torch.Tensor] = {}
    history: list[dict[str, Any]] = []
    epochs_without_improvement = 0
    stopped_early_at: int | None = None
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
    for epoch in range(1, params.epochs + 1):
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
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        # Higher is better for both: IoU, or the negated validation loss (targets without any foreground).
        selection_score = result.counts.iou if params.selection_metric == "iou" else -result.loss
        if selection_score > best_score:
            best_score, best_epoch = selection_score, epoch
            best_metrics = {
                "val_iou": result.counts.iou,
                "val_dice": result.counts.dice,
                "val_miou": result.counts.miou,
                "val_loss": result.loss,
            }
            best_state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
            epochs_without_improvement = 0
        else:
            epochs_without_improvement += 1
        past_warm_up = epoch > params.curriculum.positive_only_epochs
        if past_warm_up and epochs_without_improvement >= params.early_stopping_patience and epoch < params.epochs:
            stopped_early_at = epoch
            break
    # The kept epoch's head, thresholded on validation (every rank alike: same weights, same tiles).
    model.load_state_dict(best_state)
    head = calibrate_head(model, validation, local_batch_size, device)
    return SegmenterTrainingResult(
        best_state_dict=best_state,
        best_epoch=best_epoch,
        best_metrics=best_metrics,
        history=history,
        stopped_early_at=stopped_early_at,
        head=head,
    )

