"""The tile classifier's training loop: loss, progressive unfreezing, optimizer, schedule, selection.

The loop runs in one process or under ``torch.distributed`` (a :class:`DistributedContext` with more than
one process): the model is wrapped in ``DistributedDataParallel``, each epoch's order is the one-process
order split over the ranks (:class:`SameOrderDistributedSampler`, so every global batch is the one-process
batch), validation logits are gathered from all ranks before the metrics are taken (every rank selects the
same best epoch), and nothing here writes a file: the stage does every write, from rank 0.

Epochs are counted from 0. Epoch ``e`` trains the parameter groups :func:`trainable_groups` returns for
``e``, with augmentation seeded by ``seed + e`` and data order drawn from a generator seeded by
``seed + e``, so a run repeats exactly. ``classifier.balance`` counters class imbalance: ``sampler`` makes
each epoch a seeded class-balanced draw (:func:`class_balanced_order`), ``weight`` weights the BCE term's
positives by negatives / positives (:func:`positive_weight`).

After the last epoch the best weights' decision threshold is chosen on the validation split
(:func:`calibrate_decision`, highest balanced accuracy) and handed back with them.
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
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler, get_worker_info
from tqdm import tqdm

from weakseg.errors import UserInputError
from weakseg.losses.focal_tversky import FocalTverskyLoss
from weakseg.metrics import FALLBACK_THRESHOLD, ThresholdCalibration, calibrate_threshold, classification_scores
from weakseg.params import ClassifierParams, UnfreezeParams
from weakseg.training.common import build_optimizer as build_common_optimizer
from weakseg.training.common import autocast, worker_seed
from weakseg.training.datasets import TileDataset
from weakseg.training.distributed import (
    DistributedContext,
    SameOrderDistributedSampler,
    average_buffers,
    gather_batch,
    gather_objects,
    pad_to_multiple,
    per_process_batch_size,
    prepare_model,
    shard,
    unshard,
    wrap_model,
)

LOGGER = logging.getLogger(__name__)

#: Parameter groups of a torchvision ResNet. ``stem`` is ``conv1`` + ``bn1``; ``fc`` is the new head.
STEM_GROUP = "stem"
HEAD_GROUP = "fc"
ALL_GROUPS: frozenset[str] = frozenset({STEM_GROUP, "layer1", "layer2", "layer3", "layer4", HEAD_GROUP})
#: Pretrained groups in the order they are unfrozen; the last step (layer1 + stem) happens at ``full_epoch``.
UNFREEZE_ORDER: tuple[frozenset[str], ...] = (
    frozenset({"layer4"}),
    frozenset({"layer3"}),
    frozenset({"layer2"}),
    frozenset({"layer1", STEM_GROUP}),
)

#: History columns, in file order (docs/DEVELOPMENT.md).
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_auc", "lr")


class TrainingDivergedError(UserInputError):
    """Raised when the training loss becomes NaN or infinite (usually a learning rate that is too high)."""


# ------------------------------------------------------------------------------------------ unfreezing
def trainable_groups(epoch: int, unfreeze: UnfreezeParams) -> set[str]:
    """The parameter groups that train in ``epoch`` (counted from 0).

    With unfreezing enabled, epochs ``0 .. frozen_epochs - 1`` train only the head; the span from
    ``frozen_epochs`` to ``full_epoch`` is cut into three equal phases that add ``layer4``, then
    ``layer3``, then ``layer2``; from ``full_epoch`` on, ``layer1`` and the stem join and the whole
    network trains. Disabled, every group trains in every epoch.

    Args:
        epoch: the epoch, from 0.
        unfreeze: the schedule.

    Returns:
        A subset of :data:`ALL_GROUPS`, always containing the head.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if not unfreeze.enabled or epoch >= unfreeze.full_epoch:
        return set(ALL_GROUPS)
    if epoch < unfreeze.frozen_epochs:
        return {HEAD_GROUP}
    span = unfreeze.full_epoch - unfreeze.frozen_epochs  # > 0 here: frozen_epochs <= epoch < full_epoch
    steps = 1 + (len(UNFREEZE_ORDER) - 1) * (epoch - unfreeze.frozen_epochs) // span
    groups = {HEAD_GROUP}
    for step in UNFREEZE_ORDER[:steps]:
        groups |= step
    return groups


def parameter_group(name: str) -> str:
    """The group of a ResNet parameter or module name (``layer3.1.conv2.weight`` -> ``layer3``)."""
    head = name.split(".", 1)[0]
    if head in ("conv1", "bn1"):
        return STEM_GROUP
    if head in ALL_GROUPS:
        return head
    raise ValueError(f"parameter {name!r} belongs to no ResNet group {sorted(ALL_GROUPS)}")


def apply_trainable_groups(model: nn.Module, groups: set[str]) -> None:
    """Sets ``requires_grad`` of every parameter: True exactly for the parameters of ``groups``."""
    unknown = set(groups) - ALL_GROUPS
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}, expected a subset of {sorted(ALL_GROUPS)}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(parameter_group(name) in groups)


def set_training_mode(model: nn.Module, groups: set[str]) -> None:
    """Training mode, except the batch-norm layers of frozen groups.

    A frozen pretrained layer keeps its running statistics too: updating them on a few batches of a new
    domain would change what the frozen weights compute.
    """
    model.train()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and parameter_group(name) not in groups:
            module.eval()


# ---------------------------------------------------------------------------------- loss and optimizer
class ClassificationLoss(nn.Module):
    """``bce_weight * BCE + focal_tversky_weight * FocalTversky`` on tile logits.

    Args:
        bce_weight: weight of the binary cross-entropy (mean over tiles).
        focal_tversky_weight: weight of the Focal Tversky loss (over the batch).
        alpha: Focal Tversky weight of false negatives.
        beta: Focal Tversky weight of false positives.
        gamma: Focal Tversky focal parameter.
        pos_weight: the BCE term's weight of positive tiles (``classifier.balance: weight``); None: 1.
    """

    def __init__(
        self,
        bce_weight: float,
        focal_tversky_weight: float,
        alpha: float,
        beta: float,
        gamma: float,
        pos_weight: float | None = None,
    ) -> None:
        super().__init__()
        self.bce_weight = bce_weight
        self.focal_tversky_weight = focal_tversky_weight
        self.pos_weight = pos_weight
        self.bce = nn.BCEWithLogitsLoss()
        self.focal_tversky = FocalTverskyLoss(alpha, beta, gamma)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The combined loss of logits ``(N,)`` against 0/1 targets ``(N,)``."""
        logits = logits.float().reshape(-1)
        targets = targets.float().reshape(-1)
        loss = logits.new_zeros(())
        if self.bce_weight:
            if self.pos_weight is None:
                bce = self.bce(logits, targets)
            else:  # made on the logits' device: the loss module itself is never moved
                bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=logits.new_tensor(self.pos_weight))
            loss = loss + self.bce_weight * bce
        if self.focal_tversky_weight:
            loss = loss + self.focal_tversky_weight * self.focal_tversky(logits, targets)
        return loss


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


def positive_weight(labels: np.ndarray | list[bool]) -> float | None:
    """``classifier.balance: weight``'s BCE ``pos_weight``: negatives / positives of the training labels.

    None (no weighting) when either class is absent: there is no ratio to correct.
    """
    labels_array = np.asarray(labels, dtype=bool).reshape(-1)
    positives = int(labels_array.sum())
    negatives = int(labels_array.size - positives)
    if positives == 0 or negatives == 0:
        return None
    return negatives / positives


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


# ---------------------------------------------------------------------------------------------- data
def _seed_worker(worker_id: int, base_seed: int) -> None:
    """Gives each loader worker its own augmentation stream, derived from the epoch's seed."""
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, TileDataset):
        info.dataset.set_augmentation_seed(worker_seed(base_seed, worker_id))
    np.random.seed(worker_seed(base_seed, worker_id))
    torch.manual_seed(worker_seed(base_seed, worker_id))


def train_drops_last(dataset_size: int, batch_size: int) -> bool:
    """Whether training drops the last incomplete batch.

    It does whenever there is at least one full batch: a last batch of one tile would break batch norm,
    and shuffling puts every tile in a full batch over the epochs.
    """
    return dataset_size >= batch_size


def steps_per_epoch(dataset_size: int, batch_size: int) -> int:
    """Optimizer steps in one training epoch."""
    if dataset_size <= 0:
        raise ValueError("the training set is empty")
    return dataset_size // batch_size if train_drops_last(dataset_size, batch_size) else 1


def class_balanced_order(labels: np.ndarray | list[bool], seed: int, epoch: int) -> list[int]:
    """The tile order of one ``classifier.balance: sampler`` epoch: a class-balanced draw with replacement.

    As many tiles as ``labels`` holds are drawn, each class with total probability one half (each tile
    with ``1 / (2 * its class size)``), by a ``WeightedRandomSampler`` whose generator is seeded with
    ``seed + epoch``: the same seed and epoch give the same order, another epoch another one. With one
    class only, the draw is uniform.

    Raises:
        ValueError: if ``labels`` is empty.
    """
    labels_array = np.asarray(labels, dtype=bool).reshape(-1)
    if labels_array.size == 0:
        raise ValueError("the training set is empty")
    positives = int(labels_array.sum())
    negatives = int(labels_array.size - positives)
    weights = np.where(labels_array, 1.0 / max(positives, 1), 1.0 / max(negatives, 1))
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    sampler = WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.float64), int(labels_array.size), replacement=True, generator=generator
    )
    return [int(index) for index in sampler]


def build_train_loader(
    dataset: TileDataset,
    batch_size: int,
    seed: int,
    epoch: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    context: DistributedContext | None = None,
    balanced: bool = False,
) -> DataLoader:
    """The shuffled, augmented loader of one training epoch (of this rank, when distributed).

    The augmentation is re-seeded with ``seed + epoch`` and the order comes from a generator seeded with
    ``seed + epoch``; workers derive their own seeds from it. With ``balanced``, the order is
    :func:`class_balanced_order` of the dataset's labels (as many tiles, so as many steps, as a shuffled
    epoch). Under a distributed ``context``, ``batch_size`` is still the global batch: each rank gets its
    strided share of the one-process order (:class:`SameOrderDistributedSampler`, or the same cut of the
    balanced draw), in batches of ``batch_size / world_size``, and each rank augments with its own stream
    (derived from the epoch's seed and the rank).
    """
    epoch_seed = seed + epoch
    if context is not None and context.enabled:
        return _distributed_train_loader(dataset, batch_size, seed, epoch, num_workers, pin_memory, context, balanced)
    dataset.set_augmentation_seed(epoch_seed)
    if balanced:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=class_balanced_order(dataset.labels > 0.5, seed, epoch),
            drop_last=train_drops_last(len(dataset), batch_size),
            num_workers=num_workers,
            pin_memory=pin_memory,
            worker_init_fn=functools.partial(_seed_worker, base_seed=epoch_seed) if num_workers > 0 else None,
            persistent_workers=False,
        )
    generator = torch.Generator()
    generator.manual_seed(epoch_seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=train_drops_last(len(dataset), batch_size),
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
        worker_init_fn=functools.partial(_seed_worker, base_seed=epoch_seed) if num_workers > 0 else None,
        persistent_workers=False,
    )


def _distributed_train_loader(
    dataset: TileDataset,
    batch_size: int,
    seed: int,
    epoch: int,
    num_workers: int,
    pin_memory: bool,
    context: DistributedContext,
    balanced: bool = False,
) -> DataLoader:
    """This rank's loader of one epoch: see :func:`build_train_loader`."""
    # Ranks must not share one augmentation stream, or tiles at the same place of each rank's batch would
    # be flipped and jittered alike.
    rank_seed = worker_seed(seed + epoch, 1_000 + context.rank)
    dataset.set_augmentation_seed(rank_seed)
    drop_last = train_drops_last(len(dataset), batch_size)
    sampler: SameOrderDistributedSampler | list[int]
    if balanced:
        order = class_balanced_order(dataset.labels > 0.5, seed, epoch)
        sampler = shard(whole_global_batches(order, batch_size, drop_last, context), context)
    else:
        sampler = SameOrderDistributedSampler(len(dataset), batch_size, drop_last, context, seed)
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=per_process_batch_size(batch_size, context.world_size, "classifier.batch_size"),
        sampler=sampler,
        drop_last=False,  # the sampler already cut the order to whole global batches
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(_seed_worker, base_seed=rank_seed) if num_workers > 0 else None,
        persistent_workers=False,
    )


def whole_global_batches(
    order: list[int], global_batch_size: int, drop_last: bool, context: DistributedContext
) -> list[int]:
    """An epoch's order cut to whole global batches (``drop_last``) or padded to a multiple of the ranks.

    What :class:`SameOrderDistributedSampler` does to a shuffled order, so that every rank's strided
    share (:func:`shard`) has the same number of steps and step ``s`` of all ranks is batch ``s``.
    """
    if drop_last:
        return order[: len(order) // global_batch_size * global_batch_size]
    return pad_to_multiple(order, context.world_size)


def build_eval_loader(
    dataset: TileDataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """An ordered loader without augmentation (the dataset should have none)."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers, pin_memory=pin_memory
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
    """One pass over ``loader`` with one optimizer (and scheduler) step per batch.

    The caller sets the training mode and the trainable groups first. Under a distributed ``context``
    every rank computes the loss of the global batch (:func:`gather_batch`): the Focal Tversky term is
    a set-level loss, so per-rank losses would differ from one process's; and every rank then sees the
    same loss, so all stop together if it diverges.

    Returns:
        ``(mean loss per tile, learning rate of the last step)``.

    Raises:
        TrainingDivergedError: if a batch's loss is not finite.
    """
    total_loss = 0.0
    total_tiles = 0
    last_lr = optimizer.param_groups[0]["lr"]
    non_blocking = device.type == "cuda"
    distributed = context if context is not None and context.enabled else None
    # One progress bar per run, not one per process.
    quiet = distributed is not None and not distributed.is_main
    progress = tqdm(loader, desc=description, leave=False, unit="batch", disable=quiet)
    for images, labels in progress:
        images = images.to(device, non_blocking=non_blocking)
        labels = labels.to(device, non_blocking=non_blocking)
        with autocast(device, mixed_precision):
            logits = model(images)
        logits = logits.float().reshape(-1)
        if distributed is not None:
            logits, labels = gather_batch(logits, distributed), gather_batch(labels.float(), distributed)
        loss = loss_function(logits, labels)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"the classifier's training loss became {loss.item()} at learning rate "
                f"{optimizer.param_groups[0]['lr']:.3g}; lower classifier.lr"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        last_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        batch = int(labels.shape[0])
        total_loss += float(loss.detach()) * batch
        total_tiles += batch
        progress.set_postfix(loss=f"{total_loss / total_tiles:.4f}")
    if total_tiles == 0:
        raise ValueError("the training loader produced no batch")
    return total_loss / total_tiles, float(last_lr)


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: DataLoader, device: torch.device, mixed_precision: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every tile of ``loader``, in loader order, on the CPU (float32).

    Under DDP, these are what the ranks gather before computing metrics.
    """
    model.eval()
    all_logits: list[torch.Tensor] = []
    all_labels: list[torch.Tensor] = []
    for images, labels in loader:
        with autocast(device, mixed_precision):
            logits = model(images.to(device))
        all_logits.append(logits.float().reshape(-1).cpu())
        all_labels.append(labels.float().reshape(-1))
    if not all_logits:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(all_logits), torch.cat(all_labels)


def distributed_predict_logits(
    model: nn.Module,
    dataset: TileDataset,
    batch_size: int,
    context: DistributedContext,
    num_workers: int = 0,
    mixed_precision: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`predict_logits` of the whole ``dataset``, each rank scoring its strided share.

    Every rank gets every logit, in dataset order, so metrics and decisions are the same on all ranks.
    ``model`` is the bare model, not its DDP wrapper (ranks run different numbers of batches here).
    """
    indices = shard(range(len(dataset)), context)
    share = torch.utils.data.Subset(dataset, indices)
    local_batch = max(1, batch_size // context.world_size)
    loader = build_eval_loader(share, local_batch, num_workers, context.device.type == "cuda")  # type: ignore[arg-type]
    logits, labels = predict_logits(model, loader, context.device, mixed_precision)
    gathered = gather_objects((logits.tolist(), labels.tolist()), context)
    all_logits = unshard([part[0] for part in gathered], len(dataset))
    all_labels = unshard([part[1] for part in gathered], len(dataset))
    return torch.tensor(all_logits, dtype=torch.float32), torch.tensor(all_labels, dtype=torch.float32)


def validation_scores(logits: torch.Tensor, labels: torch.Tensor, loss_function: nn.Module) -> dict[str, float]:
    """Loss and classification metrics of a whole validation split's logits.

    The loss is computed over the whole split at once (the Focal Tversky term is a set-level loss, so
    this does not depend on the batch size).
    """
    loss = float(loss_function(logits, labels))
    probabilities = torch.sigmoid(logits).numpy().astype(np.float64)
    scores = classification_scores(labels.numpy() > 0.5, probabilities)
    return {"loss": loss, **scores}


def majority_class_rate(labels: np.ndarray | list[bool]) -> float:
    """The accuracy of always predicting the more frequent class."""
    labels_array = np.asarray(labels, dtype=bool)
    if labels_array.size == 0:
        return 0.0
    positives = float(labels_array.mean())
    return max(positives, 1.0 - positives)


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


def choose_decision(labels: torch.Tensor, logits: torch.Tensor) -> ThresholdCalibration:
    """The balanced-accuracy threshold of validation ``logits`` against 0/1 ``labels``, and its scores.

    :func:`weakseg.metrics.choose_balanced_accuracy_threshold` states the rule, the tie rule and when 0.5
    is kept (a split of one class, or no cut better than chance).
    """
    positives = labels.numpy().reshape(-1) > 0.5
    probabilities = torch.sigmoid(logits.float()).numpy().astype(np.float64).reshape(-1)
    return calibrate_threshold(positives, probabilities)


def calibrate_decision(
    model: nn.Module,
    validation_dataset: TileDataset,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    context: DistributedContext | None = None,
) -> ThresholdCalibration:
    """Chooses the (best) model's decision threshold on the validation split and scores it there.

    The model runs in float32 without autocast, as ``evaluate`` and ``predict`` run the saved checkpoint;
    under a distributed ``context`` every rank scores its share and all get the same answer. ``model`` is
    the bare model, not its DDP wrapper.
    """
    if context is not None and context.enabled:
        logits, labels = distributed_predict_logits(model, validation_dataset, batch_size, context, num_workers)
    else:
        loader = build_eval_loader(validation_dataset, batch_size, num_workers, device.type == "cuda")
        logits, labels = predict_logits(model, loader, device)
    return choose_decision(labels, logits)


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
    train_labels = np.asarray(train_dataset.labels) > 0.5
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
    history: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] = {}  # set by the first epoch, which always counts as best
    best_value: float | None = None
    best_epoch = -1
    best_scores: dict[str, float] = {}
    for epoch in range(params.epochs):
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
        history.append(row)
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
        if on_epoch_end is not None:
            on_epoch_end(row)
        value = scores[params.selection_metric]
        if is_better(params.selection_metric, value, best_value):
            best_value = value
            best_epoch = epoch
            best_scores = dict(scores)
            best_state = {key: tensor.detach().cpu().clone() for key, tensor in model.state_dict().items()}
    # The model leaves the loop with every parameter trainable, as a user of the returned model expects.
    apply_trainable_groups(model, set(ALL_GROUPS))
    # The kept epoch's decision threshold, chosen on validation (every rank alike: same weights, same tiles).
    model.load_state_dict(best_state)
    decision = calibrate_decision(model, validation_dataset, params.batch_size, device, params.num_workers, distributed)
    model.eval()
    return TrainingResult(best_state, best_epoch, best_scores, history, decision, params.balance, pos_weight)
