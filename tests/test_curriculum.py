"""The negative-tile curriculum: schedule and the seeded per-epoch sampler."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from weakseg.params import CurriculumParams
from weakseg.training.curriculum import epoch_indices, negative_probability, shard_indices

PAPER = CurriculumParams(positive_only_epochs=10, final_negative_probability=0.3)


def test_schedule_is_zero_then_linear_to_final() -> None:
    probabilities = [negative_probability(epoch, 35, PAPER) for epoch in range(1, 36)]
    assert probabilities[:10] == [0.0] * 10
    assert probabilities[10] == pytest.approx(0.3 / 25)
    assert probabilities[22] == pytest.approx(0.3 * 13 / 25)
    assert probabilities[-1] == pytest.approx(0.3)
    steps = np.diff(probabilities[10:])
    assert np.allclose(steps, 0.3 / 25)


def test_schedule_without_room_for_negatives_stays_positive_only() -> None:
    curriculum = CurriculumParams(positive_only_epochs=5, final_negative_probability=0.3)
    assert [negative_probability(epoch, 5, curriculum) for epoch in range(1, 6)] == [0.0] * 5
    with pytest.raises(ValueError, match="outside"):
        negative_probability(0, 5, curriculum)


def test_sampler_takes_every_positive_and_no_negative_in_warm_up() -> None:
    positives = np.array([True] * 20 + [False] * 80)
    indices = epoch_indices(positives, 3, 35, PAPER, seed=7)
    assert sorted(indices.tolist()) == list(range(20))
    assert indices.tolist() != list(range(20))  # shuffled


def test_sampler_negative_fraction_follows_probability() -> None:
    positives = np.array([True] * 100 + [False] * 4000)
    for epoch in (11, 23, 35):
        indices = epoch_indices(positives, epoch, 35, PAPER, seed=1)
        assert set(range(100)) <= set(indices.tolist())
        assert len(set(indices.tolist())) == len(indices)
        drawn = int(np.count_nonzero(~positives[indices]))
        expected = negative_probability(epoch, 35, PAPER) * 4000
        assert abs(drawn - expected) < 4 * np.sqrt(expected) + 1


def test_sampler_is_a_function_of_epoch_and_seed() -> None:
    positives = np.array([True, False] * 50)
    first = epoch_indices(positives, 30, 35, PAPER, seed=3)
    assert np.array_equal(first, epoch_indices(positives, 30, 35, PAPER, seed=3))
    assert not np.array_equal(first, epoch_indices(positives, 30, 35, PAPER, seed=4))
    assert not np.array_equal(first, epoch_indices(positives, 31, 35, PAPER, seed=3))


def test_shards_are_disjoint_and_cover_the_epoch() -> None:
    indices = epoch_indices(np.array([True, False] * 30), 35, 35, PAPER, seed=0)
    shards = [shard_indices(indices, rank, 3) for rank in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == sorted(indices.tolist())
    assert max(len(shard) for shard in shards) - min(len(shard) for shard in shards) <= 1


def test_a_start_probability_lifts_the_ramp_and_one_to_one_is_no_curriculum() -> None:
    from weakseg.params import CurriculumParams

    ramp = CurriculumParams(positive_only_epochs=2, start_negative_probability=0.5, final_negative_probability=1.0)
    assert [negative_probability(epoch, 6, ramp) for epoch in range(1, 7)] == [0.0, 0.0, 0.625, 0.75, 0.875, 1.0]
    everything = CurriculumParams(
        positive_only_epochs=0, start_negative_probability=1.0, final_negative_probability=1.0
    )
    labels = np.array([True, False, False, True, False])
    for epoch in range(1, 4):
        assert negative_probability(epoch, 3, everything) == 1.0
        assert sorted(epoch_indices(labels, epoch, 3, everything, seed=1).tolist()) == [0, 1, 2, 3, 4]
    # The default start (0) keeps the original ramp: final * (e - K) / (epochs - K).
    default = CurriculumParams(positive_only_epochs=1, final_negative_probability=0.3)
    assert negative_probability(3, 4, default) == 0.3 * 2 / 3


def test_oversampling_repeats_negatives_by_the_set_ratio_only_when_they_are_fewer() -> None:
    every_tile: dict[str, Any] = {
        "positive_only_epochs": 0,
        "start_negative_probability": 1.0,
        "final_negative_probability": 1.0,
    }
    labels = np.array([True] * 10 + [False] * 2)
    plain = epoch_indices(labels, 3, 5, CurriculumParams(**every_tile), seed=7)
    balanced = epoch_indices(labels, 3, 5, CurriculumParams(**every_tile, oversample_negatives=True), seed=7)
    assert sorted(plain.tolist()) == list(range(12))
    assert labels[balanced].sum() == 10 and (~labels[balanced]).sum() == 10  # 2 drawn + 2 * (10 / 2 - 1) copies
    assert set(balanced[~labels[balanced]].tolist()) == {10, 11}
    again = epoch_indices(labels, 3, 5, CurriculumParams(**every_tile, oversample_negatives=True), seed=7)
    assert np.array_equal(balanced, again)

    negative_heavy = np.array([True] * 3 + [False] * 9)
    ramp: dict[str, Any] = {"positive_only_epochs": 1, "final_negative_probability": 0.5}
    for epoch in (1, 2, 5):  # few negatives drawn early in the ramp, but the set is rich in them: no copies
        assert np.array_equal(
            epoch_indices(negative_heavy, epoch, 5, CurriculumParams(**ramp), seed=1),
            epoch_indices(negative_heavy, epoch, 5, CurriculumParams(**ramp, oversample_negatives=True), seed=1),
        )


def test_oversampling_keeps_the_curriculum_share_and_adds_nothing_in_positive_only_epochs() -> None:
    labels = np.array([True] * 40 + [False] * 10)
    curriculum = CurriculumParams(positive_only_epochs=2, final_negative_probability=0.5, oversample_negatives=True)
    assert sorted(epoch_indices(labels, 1, 6, curriculum, seed=0).tolist()) == list(range(40))
    last = epoch_indices(labels, 6, 6, curriculum, seed=0)
    drawn = len(set(last[~labels[last]].tolist()))
    assert (~labels[last]).sum() == drawn * 4  # each drawn negative counts 40 / 10 times
