"""The segmenter's curriculum: positive tiles first, then negative tiles at a rising probability.

Epochs are numbered from 1, as in the history files. The epoch's tile list is a pure function of
``(epoch, seed)`` and the labels, so every process of a distributed run can compute the same list and take
its own shard of it (:func:`shard_indices`) without communicating.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from weakseg.params import CurriculumParams


def negative_probability(epoch: int, epochs: int, curriculum: CurriculumParams) -> float:
    """The probability with which each negative tile is drawn into ``epoch``.

    Epochs ``1 .. positive_only_epochs`` see no negative tile (0.0). After them the probability rises
    linearly and reaches ``final_negative_probability`` at the last epoch: epoch ``e`` gets
    ``start + (final - start) * (e - K) / (epochs - K)`` with ``K = positive_only_epochs`` and ``start =
    start_negative_probability`` (0 by default; ``start = final = 1``: every tile in every epoch).

    Args:
        epoch: the epoch, from 1.
        epochs: the number of epochs of the run.
        curriculum: the schedule.

    Raises:
        ValueError: if ``epoch`` is outside ``1 .. epochs``.
    """
    if not 1 <= epoch <= epochs:
        raise ValueError(f"epoch {epoch} is outside 1..{epochs}")
    warm_up = curriculum.positive_only_epochs
    if epoch <= warm_up:
        return 0.0
    start = curriculum.start_negative_probability
    return float(start + (curriculum.final_negative_probability - start) * (epoch - warm_up) / (epochs - warm_up))


def epoch_indices(
    positives: Sequence[bool] | np.ndarray,
    epoch: int,
    epochs: int,
    curriculum: CurriculumParams,
    seed: int,
) -> np.ndarray:
    """The shuffled indices of the tiles one epoch trains on.

    "Sampled with probability p" means: every positive tile is in every epoch, and each negative tile is
    included independently with probability ``p = negative_probability(epoch, ...)`` (a Bernoulli draw
    per tile, so an epoch holds ``p * negatives`` negative tiles on average, not exactly). The draw and the
    order depend only on ``(seed, epoch)`` and the labels.

    Args:
        positives: per tile, whether its image label is positive.
        epoch: the epoch, from 1.
        epochs: the number of epochs of the run.
        curriculum: the schedule.
        seed: the run's seed.

    Returns:
        An int64 array of tile indices in training order.
    """
    labels = np.asarray(positives, dtype=bool)
    probability = negative_probability(epoch, epochs, curriculum)
    generator = np.random.default_rng([seed, epoch])
    # Drawn for every negative even at p = 0, so the stream (and any later draw) does not shift with p.
    included_negatives = generator.random(labels.size) < probability
    chosen = np.flatnonzero(labels | (~labels & included_negatives))
    if curriculum.oversample_negatives:
        chosen = np.concatenate([chosen, negative_repeats(labels, chosen, seed, epoch)])
    return chosen[generator.permutation(chosen.size)].astype(np.int64)


def negative_repeats(labels: np.ndarray, chosen: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Extra copies of an epoch's negative tiles when the training set holds fewer negatives than positives.

    A set with many more positive than negative tiles (10:1, say) would otherwise teach the segmenter mostly
    "lesion", and its few negative tiles are the only pixel labels of normal tissue. The epoch's drawn
    negatives are topped up by ``(positives / negatives - 1)`` times their number (rounded), so the
    curriculum's share of negatives is kept, relative to a set as rich in negatives as in positives. Empty
    when the set has at least as many negatives as positives, or the epoch drew none. The copies are a
    seeded draw with replacement from the epoch's negatives, from a stream of their own
    (``[seed, epoch, 1]``), so an epoch that needs none is exactly what it was without the option.

    Args:
        labels: per tile of the training set, whether it is positive.
        chosen: the epoch's tiles before repeats.
        seed: the run's seed.
        epoch: the epoch, from 1.
    """
    positives, negatives = int(labels.sum()), int((~labels).sum())
    drawn_negatives = chosen[~labels[chosen]]
    if negatives == 0 or positives <= negatives or drawn_negatives.size == 0:
        return np.zeros(0, dtype=chosen.dtype)
    missing = int(round(drawn_negatives.size * (positives / negatives - 1.0)))
    return np.random.default_rng([seed, epoch, 1]).choice(drawn_negatives, size=missing, replace=True)


def shard_indices(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The part of an epoch's indices one of ``world_size`` processes trains on (strided, disjoint).

    Args:
        indices: the epoch's full list (:func:`epoch_indices`).
        rank: this process, ``0 .. world_size - 1``.
        world_size: how many processes share the epoch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return np.asarray(indices)[rank::world_size]
