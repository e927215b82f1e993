"""The training engine: the batch loop (steps, sums, divergence, clipping) and the epoch loop (history,
callback, best-epoch selection, early stopping and its warm-up), on a one-weight model."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from weakseg.errors import UserInputError
from weakseg.training.engine import (
    DivergenceCheck,
    EarlyStopping,
    EpochOutcome,
    fit,
    strictly_higher,
    train_epoch,
)


class _Diverged(UserInputError):
    """A loop's own divergence error."""


DIVERGENCE = DivergenceCheck(_Diverged, lambda loss: f"loss {loss}; lower some.lr")


def _weight(value: float = 1.0) -> torch.nn.Linear:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def _squared_error(model: torch.nn.Module) -> Any:
    """A batch ``(inputs, targets)`` -> (mean squared error, tiles)."""

    def batch_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        inputs, targets = batch
        return ((model(inputs) - targets) ** 2).mean(), len(inputs)

    return batch_loss


# ------------------------------------------------------------------------------------------ train_epoch
def test_each_batch_takes_one_step_on_its_own_gradient_and_the_loss_is_tile_weighted() -> None:
    model = _weight(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # Batch 1: x = 1, target 0 -> loss w^2 = 1, gradient 2w = 2 -> w = 0.8.
    # Batch 2 (3 tiles): x = 2, target 0 -> loss 4 w^2 = 2.56, gradient 8w = 6.4 -> w = 0.16.
    batches = [
        (torch.ones(1, 1), torch.zeros(1, 1)),
        (torch.full((3, 1), 2.0), torch.zeros(3, 1)),
    ]
    epoch = train_epoch(batches, _squared_error(model), optimizer, None, DIVERGENCE)
    assert model.weight.item() == pytest.approx(0.16)  # batch 1's gradient, kept, would give -0.04
    assert epoch.tiles == 4
    assert epoch.loss_sum == pytest.approx(1.0 * 1 + 2.56 * 3)
    assert epoch.last_lr == 0.1


def test_the_schedule_steps_after_each_batch_and_last_lr_is_the_last_steps_rate() -> None:
    model = _weight()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    batches = [(torch.ones(1, 1), torch.zeros(1, 1))] * 3
    epoch = train_epoch(batches, _squared_error(model), optimizer, scheduler, DIVERGENCE)
    assert epoch.last_lr == 0.25  # the rate of step 3; the optimizer now holds the next one
    assert optimizer.param_groups[0]["lr"] == 0.125


def test_an_empty_epoch_sums_nothing_and_reports_the_current_rate() -> None:
    model = _weight()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    epoch = train_epoch([], _squared_error(model), optimizer, None, DIVERGENCE)
    assert (epoch.loss_sum, epoch.tiles, epoch.last_lr) == (0.0, 0, 0.3)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_loss_raises_the_loops_error_before_any_step(bad: float) -> None:
    model = _weight(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.ones(1, 1), torch.zeros(1, 1)), (torch.ones(1, 1), torch.full((1, 1), bad))]
    with pytest.raises(_Diverged, match=r"lower some\.lr") as caught:
        train_epoch(batches, _squared_error(model), optimizer, None, DIVERGENCE)
    assert str(caught.value).startswith(f"loss {bad}")  # the message gets the loss value
    assert model.weight.item() == pytest.approx(0.8)  # the first batch's step only


def test_gradients_are_clipped_only_with_a_positive_norm() -> None:
    steps = []
    for norm in (0.0, 0.5):
        model = _weight(1.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        batch = [(torch.ones(1, 1), torch.zeros(1, 1))]  # gradient 2
        train_epoch(batch, _squared_error(model), optimizer, None, DIVERGENCE, clip_model=model, grad_clip_norm=norm)
        steps.append(1.0 - model.weight.item())
    assert steps == pytest.approx([2.0, 0.5])


def test_the_progress_bar_shows_the_running_mean_loss() -> None:
    class Bar(list):
        def __init__(self, batches: list[Any]) -> None:
            super().__init__(batches)
            self.postfixes: list[dict[str, str]] = []

        def set_postfix(self, **values: str) -> None:
            self.postfixes.append(values)

    model = _weight(0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    bar = Bar([(torch.ones(1, 1), torch.ones(1, 1)), (torch.ones(1, 1), torch.full((1, 1), 3.0))])
    train_epoch(bar, _squared_error(model), optimizer, None, DIVERGENCE, progress=bar)
    assert bar.postfixes == [{"loss": "1.0000"}, {"loss": "5.0000"}]


# ------------------------------------------------------------------------------------------------- fit
def _scripted(model: torch.nn.Module, scores: list[float]) -> Any:
    """An epoch that sets the weight to the epoch number and reports the next scripted score."""
    script = iter(scores)

    def run_epoch(epoch: int) -> EpochOutcome:
        weight = model.weight
        assert isinstance(weight, torch.Tensor)
        with torch.no_grad():
            weight.fill_(float(epoch))
        score = next(script)
        return EpochOutcome({"epoch": epoch, "score": score}, score, {"score": score, "epoch_seen": float(epoch)})

    return run_epoch


def test_fit_keeps_the_strictly_best_epochs_weights_and_calls_back_every_row_in_order() -> None:
    model = _weight()
    rows: list[dict[str, Any]] = []
    result = fit(model, range(1, 6), _scripted(model, [0.2, 0.6, 0.5, 0.6, 0.4]), strictly_higher, rows.append)
    assert result.best_epoch == 2  # the tie at epoch 4 keeps epoch 2
    assert result.best_metrics == {"score": 0.6, "epoch_seen": 2.0}
    assert result.best_state_dict["weight"].item() == 2.0  # a copy: the model went on to weight 5
    assert model.weight.item() == 5.0
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5]
    assert rows == result.history
    assert result.stopped_early_at is None


def test_fit_takes_the_loops_own_rule() -> None:
    def lower_is_better(candidate: float, best: float | None) -> bool:
        return best is None or candidate < best

    model = _weight()
    result = fit(model, range(3), _scripted(model, [0.5, 0.1, 0.3]), lower_is_better)
    assert (result.best_epoch, result.best_metrics["score"]) == (1, 0.1)


def test_a_run_without_any_better_score_keeps_no_epoch() -> None:
    model = _weight()
    result = fit(model, range(1, 3), _scripted(model, [math.nan, math.nan]), strictly_higher)
    assert (result.best_epoch, result.best_state_dict, result.best_metrics) == (0, {}, {})
    result = fit(model, range(0, 2), _scripted(model, [math.nan, math.nan]), strictly_higher)
    assert result.best_epoch == -1  # the epoch before the first, counted the loop's way


def test_early_stopping_ends_the_run_after_patience_epochs_without_a_new_best() -> None:
    model = _weight()
    result = fit(
        model,
        range(1, 7),
        _scripted(model, [0.2, 0.6, 0.5, 0.6, 0.4, 0.9]),
        strictly_higher,
        early_stopping=EarlyStopping(patience=2),
    )
    assert result.stopped_early_at == 4
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert result.best_epoch == 2


def test_early_stopping_never_fires_in_the_warm_up() -> None:
    model = _weight()
    scores = [0.5, 0.1, 0.1, 0.1, 0.1]
    result = fit(model, range(1, 6), _scripted(model, scores), strictly_higher, early_stopping=EarlyStopping(1, 3))
    assert result.stopped_early_at == 4  # epochs 2 and 3 were without a new best, but in the warm-up
    assert result.best_epoch == 1


def test_the_last_epoch_is_never_an_early_stop() -> None:
    model = _weight()
    result = fit(model, range(1, 3), _scripted(model, [0.5, 0.1]), strictly_higher, early_stopping=EarlyStopping(1))
    assert result.stopped_early_at is None and len(result.history) == 2


@pytest.mark.parametrize(
    ("position", "without_improvement", "expected"),
    [(0, 5, False), (1, 5, False), (2, 1, False), (2, 2, True), (3, 2, True), (4, 9, False)],
)
def test_stopping_rule(position: int, without_improvement: int, expected: bool) -> None:
    assert EarlyStopping(patience=2, warm_up_epochs=2).stops(position, without_improvement, 5) is expected


@pytest.mark.parametrize(
    ("candidate", "best", "expected"),
    [
        (0.0, None, True),
        (-math.inf, None, False),
        (math.nan, None, False),
        (0.6, 0.5, True),
        (0.5, 0.5, False),
        (0.4, 0.5, False),
        (math.nan, 0.5, False),
        (0.1, math.nan, False),
    ],
)
def test_strictly_higher(candidate: float, best: float | None, expected: bool) -> None:
    assert strictly_higher(candidate, best) is expected
