"""The training engine both loops run on: the batch loop and the epoch loop, without their model or data.

:func:`train_epoch` is one pass over an epoch's batches: zero the gradients, ask the loop for the batch's
loss, stop with the loop's own error if it is not finite, step back, clip, step the optimizer and the
schedule, and sum the tile-weighted loss. :func:`fit` is the run: one loop-supplied epoch after another, each
epoch's history row handed to the per-epoch callback, the best epoch kept by the loop's rule (its weights
copied to the CPU), and early stopping, which never fires during a warm-up.

What differs between the classifier and the segmenter stays with them: the model and its forward pass
(autocast, gathering over ranks), the loss, the epoch's batches and their seeding, validation, the
history row's columns, and the rule that says whether a score beats the best so far. The engine draws
no random number, so the loops consume the random streams (seeding, loader generators, augmentation,
dropout) exactly as their own code orders them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

#: A batch as the loader yields it -> (the scalar loss to step on, the number of tiles it covers).
BatchLoss = Callable[[Any], tuple[torch.Tensor, int]]
#: (a candidate epoch's score, the best score so far or None before the first epoch) -> it replaces the best.
SelectionRule = Callable[[float, float | None], bool]
EpochCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class DivergenceCheck:
    """What a loop raises when a batch's loss is NaN or infinite.

    Attributes:
        error: the loop's error class (a ``UserInputError``: the fix is a parameter).
        message: the message, given the loss value; it names the parameter to change.
    """

    error: type[Exception]
    message: Callable[[float], str]


@dataclass
class EpochLoss:
    """The training loss of one epoch as sums, and the learning rate of its last step.

    ``last_lr`` is the rate the last optimizer step used (the optimizer's rate when no batch ran).
    """

    loss_sum: float
    tiles: int
    last_lr: float


def train_epoch(
    batches: Iterable[Any],
    batch_loss: BatchLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    divergence: DivergenceCheck,
    *,
    clip_model: nn.Module | None = None,
    grad_clip_norm: float = 0.0,
    progress: tqdm | None = None,
) -> EpochLoss:
    """One pass over ``batches`` with one optimizer (and scheduler) step per batch.

    The caller sets the model's training mode first; ``batch_loss`` runs the forward pass.

    Args:
        batches: the epoch's batches (a loader, or the progress bar around it).
        batch_loss: a batch's loss and its tile count (under DDP, the global batch's).
        optimizer: stepped once per batch, its gradients zeroed before the batch's forward pass.
        scheduler: stepped once per batch after the optimizer; None for a constant rate.
        divergence: the error a non-finite loss raises.
        clip_model: whose gradient norm is clipped to ``grad_clip_norm`` before each step.
        grad_clip_norm: the clipping norm; 0 does not clip.
        progress: the bar wrapping ``batches``, to show the running mean loss on; None shows none.

    Raises:
        Exception: ``divergence.error``, if a batch's loss is not finite (before that batch changes a weight).
    """
    loss_sum = 0.0
    tiles = 0
    last_lr = optimizer.param_groups[0]["lr"]
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss, batch_tiles = batch_loss(batch)
        if not torch.isfinite(loss):
            raise divergence.error(divergence.message(loss.item()))
        loss.backward()
        if clip_model is not None and grad_clip_norm > 0:
            nn.utils.clip_grad_norm_(clip_model.parameters(), grad_clip_norm)
        last_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += float(loss.detach()) * batch_tiles
        tiles += batch_tiles
        if progress is not None:
            progress.set_postfix(loss=f"{loss_sum / tiles:.4f}")
    return EpochLoss(loss_sum, tiles, float(last_lr))


@dataclass
class EpochOutcome:
    """What a loop's epoch hands the engine.

    Attributes:
        row: the epoch's history row, in the history file's column order.
        score: the epoch's selection score, compared by the loop's :data:`SelectionRule`.
        metrics: what the result reports as the best metrics if this epoch is kept.
    """

    row: dict[str, Any]
    score: float
    metrics: dict[str, float]


def strictly_higher(candidate: float, best: float | None) -> bool:
    """Higher is better and ties keep the earlier epoch; before any best, anything above ``-inf`` counts.

    A NaN never wins, so a run whose every score is NaN keeps no epoch.
    """
    return candidate > (-math.inf if best is None else best)


@dataclass(frozen=True)
class EarlyStopping:
    """End the run after ``patience`` epochs in a row without a new best, but never in the warm-up.

    Attributes:
        patience: epochs without a new best that end the run.
        warm_up_epochs: the first epochs of the run, during which it never ends early.
    """

    patience: int
    warm_up_epochs: int = 0

    def stops(self, position: int, epochs_without_improvement: int, epoch_count: int) -> bool:
        """Whether the run ends after the epoch at ``position`` (from 0) of ``epoch_count``.

        The last epoch never counts as stopping early: the run ends there anyway.
        """
        past_warm_up = position >= self.warm_up_epochs
        return past_warm_up and epochs_without_improvement >= self.patience and position < epoch_count - 1


@dataclass
class FitResult:
    """What :func:`fit` hands back.

    ``best_epoch`` is the epoch before the first (``epochs[0] - 1``) and ``best_state_dict`` empty when no
    epoch was kept; ``stopped_early_at`` is the epoch after which early stopping ended the run, if it did.
    """

    best_state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early_at: int | None = None


def fit(
    model: nn.Module,
    epochs: Sequence[int],
    run_epoch: Callable[[int], EpochOutcome],
    is_better: SelectionRule,
    on_epoch: EpochCallback | None = None,
    early_stopping: EarlyStopping | None = None,
) -> FitResult:
    """Runs ``run_epoch`` for each of ``epochs`` and keeps the best epoch's weights.

    After each epoch its row joins the history and goes to ``on_epoch``; then ``is_better(score, best)``
    decides whether the epoch replaces the best, whose weights are copied (to the CPU) from ``model``;
    then ``early_stopping``, if given, may end the run.

    Args:
        model: the model whose ``state_dict`` is kept (the bare model, not a DDP wrapper).
        epochs: the epoch numbers, in order (the loop's counting: from 0 or from 1).
        run_epoch: trains and validates one epoch.
        is_better: the loop's selection rule.
        on_epoch: called with each history row as it is made (e.g. to log it).
        early_stopping: None runs every epoch.

    Returns:
        The best weights, epoch and metrics, the history, and where early stopping ended the run.
    """
    history: list[dict[str, Any]] = []
    best_score: float | None = None
    best_epoch = epochs[0] - 1 if epochs else -1
    best_metrics: dict[str, float] = {}
    best_state: dict[str, torch.Tensor] = {}
    epochs_without_improvement = 0
    stopped_early_at: int | None = None
    for position, epoch in enumerate(epochs):
        outcome = run_epoch(epoch)
        history.append(outcome.row)
        if on_epoch is not None:
            on_epoch(outcome.row)
        if is_better(outcome.score, best_score):
            best_score, best_epoch = outcome.score, epoch
            best_metrics = dict(outcome.metrics)
            best_state = {key: tensor.detach().cpu().clone() for key, tensor in model.state_dict().items()}
            epochs_without_improvement = 0
        else:
            epochs_without_improvement += 1
        if early_stopping is not None and early_stopping.stops(position, epochs_without_improvement, len(epochs)):
            stopped_early_at = epoch
            break
    return FitResult(best_state, best_epoch, best_metrics, history, stopped_early_at)
