"""Every metric on hand-made predictions with known answers, including the degenerate cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from sklearn.metrics import roc_auc_score

from weakseg import metrics

# 2 x 3 tile: TP at (0,0),(0,1); FP at (0,2); FN at (1,0); TN at (1,1),(1,2).
PREDICTION = np.array([[1, 1, 1], [0, 0, 0]], dtype=bool)
TRUTH = np.array([[1, 1, 0], [1, 0, 0]], dtype=bool)


def test_pixel_counts_have_known_values() -> None:
    counts = metrics.PixelCounts().add(PREDICTION, TRUTH)
    assert (counts.true_positive, counts.false_positive, counts.false_negative, counts.true_negative) == (2, 1, 1, 2)
    assert counts.iou == pytest.approx(2 / 4)
    assert counts.dice == pytest.approx(4 / 6)
    assert counts.background_iou == pytest.approx(2 / 4)
    assert counts.miou == pytest.approx(0.5)


def test_pixel_counts_accept_0_255_masks_and_a_region() -> None:
    counts = metrics.PixelCounts().add(
        PREDICTION.astype(np.uint8) * 255, TRUTH.astype(np.uint8) * 255, where=np.array([[1, 0, 1], [1, 1, 1]])
    )
    # (0,1), a true positive, is outside the region.
    assert (counts.true_positive, counts.false_positive, counts.false_negative, counts.true_negative) == (1, 1, 1, 2)


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        metrics.PixelCounts().add(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


def test_tile_scores_of_empty_and_disjoint_masks() -> None:
    empty = np.zeros((4, 4), dtype=bool)
    full = np.ones((4, 4), dtype=bool)
    assert metrics.tile_iou(empty, empty) == 1.0 and metrics.tile_dice(empty, empty) == 1.0
    assert metrics.tile_iou(empty, full) == 0.0 and metrics.tile_dice(full, empty) == 0.0
    assert metrics.tile_iou(PREDICTION, TRUTH) == pytest.approx(0.5)


def test_segmentation_scores_pool_pixels_and_count_false_positives_on_negatives() -> None:
    positive_prediction = np.array([[1, 1, 0, 0]], dtype=bool)
    positive_truth = np.array([[0, 1, 1, 0]], dtype=bool)  # TP 1, FP 1, FN 1, TN 1
    negative_prediction = np.array([[1, 1, 1, 0]], dtype=bool)  # FP 3, TN 1
    negative_truth = np.zeros((1, 4), dtype=bool)
    scores = metrics.segmentation_scores(
        [positive_prediction, negative_prediction], [positive_truth, negative_truth], [True, False]
    )
    assert scores["iou"] == pytest.approx(1 / 6)
    assert scores["dice"] == pytest.approx(2 / 7)
    assert scores["miou"] == pytest.approx((1 / 6 + 2 / 7) / 2)  # background: TN 2 / (2 + 4 + 1)
    assert scores["iou_positive_mean"] == pytest.approx(1 / 3)
    assert (scores["positive_tiles"], scores["tiles"]) == (1, 2)


def test_all_negative_set_with_empty_predictions_is_perfect_and_defined() -> None:
    empty = [np.zeros((3, 3), dtype=bool)] * 3
    scores = metrics.segmentation_scores(empty, empty, [False] * 3)
    assert (scores["iou"], scores["dice"], scores["miou"]) == (1.0, 1.0, 1.0)
    assert scores["iou_positive_mean"] == 0.0 and scores["positive_tiles"] == 0
    assert not any(isinstance(value, float) and math.isnan(value) for value in scores.values())


def test_all_negative_set_with_false_positives_scores_zero_foreground() -> None:
    prediction = np.zeros((2, 2), dtype=bool)
    prediction[0, 0] = True
    scores = metrics.segmentation_scores([prediction], [np.zeros((2, 2), bool)], [False])
    assert (scores["iou"], scores["dice"]) == (0.0, 0.0)
    assert scores["miou"] == pytest.approx((0.0 + 3 / 4) / 2)


def test_empty_predictions_on_positive_tiles_score_zero_not_nan() -> None:
    truth = np.zeros((2, 2), dtype=bool)
    truth[0] = True
    scores = metrics.segmentation_scores([np.zeros((2, 2), bool)], [truth], [True])
    assert (scores["iou"], scores["dice"], scores["iou_positive_mean"]) == (0.0, 0.0, 0.0)
    assert scores["miou"] == pytest.approx(0.25)  # background IoU 2 / 4


def test_empty_tile_set_is_defined() -> None:
    scores = metrics.segmentation_scores([], [], [])
    assert scores["iou"] == 1.0 and scores["tiles"] == 0


def _random_masks(seed: int, tiles: int = 12, size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded predictions, truths and tile labels: random densities, some empty truths and predictions."""
    rng = np.random.default_rng(seed)
    predictions = rng.random((tiles, size, size)) < rng.uniform(0.0, 0.6, size=(tiles, 1, 1))
    truths = rng.random((tiles, size, size)) < rng.uniform(0.0, 0.6, size=(tiles, 1, 1))
    truths[rng.random(tiles) < 0.4] = False  # negative tiles: empty truth, false positives may remain
    predictions[rng.random(tiles) < 0.2] = False
    truths[0] = predictions[0] = False  # one tile empty in both
    labels = truths.reshape(tiles, -1).any(axis=1)
    assert isinstance(labels, np.ndarray)
    return predictions, truths, labels


def _smp_stats(predictions: np.ndarray, truths: np.ndarray) -> tuple[torch.Tensor, ...]:
    """segmentation_models_pytorch's per-tile confusion counts, shape (tiles, 1)."""
    output, target = (torch.from_numpy(masks[:, None].astype(np.int64)) for masks in (predictions, truths))
    return smp.metrics.get_stats(output, target, mode="binary")


@pytest.mark.parametrize("seed", range(6))
def test_pooled_scores_match_segmentation_models_pytorch(seed: int) -> None:
    predictions, truths, positives = _random_masks(seed)
    ours = metrics.segmentation_scores(list(predictions), list(truths), list(positives))
    stats = _smp_stats(predictions, truths)
    background = _smp_stats(~predictions, ~truths)
    assert ours["iou"] == pytest.approx(float(smp.metrics.iou_score(*stats, reduction="micro")), abs=1e-6)
    assert ours["dice"] == pytest.approx(float(smp.metrics.f1_score(*stats, reduction="micro")), abs=1e-6)
    foreground_and_background = float(smp.metrics.iou_score(*stats, reduction="micro")) + float(
        smp.metrics.iou_score(*background, reduction="micro")
    )
    assert ours["miou"] == pytest.approx(foreground_and_background / 2, abs=1e-6)
    # The paper's protocol: per-tile IoU averaged over positive tiles ("micro-imagewise" in smp).
    positive_stats = [counts[torch.from_numpy(positives)] for counts in stats]
    imagewise = float(smp.metrics.iou_score(*positive_stats, reduction="micro-imagewise"))
    assert ours["iou_positive_mean"] == pytest.approx(imagewise, abs=1e-6)


def test_all_empty_tiles_score_one_where_smp_micro_gives_nan() -> None:
    # The one documented difference: smp's pooled ("micro") ratio is 0/0 = NaN when no tile has foreground
    # in prediction or truth; weakseg scores that 1.0 (nothing to find, nothing wrongly found), which is
    # also what smp's own zero_division gives per tile.
    empty = np.zeros((3, 8, 8), dtype=bool)
    ours = metrics.segmentation_scores(list(empty), list(empty), [False] * 3)
    stats = _smp_stats(empty, empty)
    assert math.isnan(float(smp.metrics.iou_score(*stats, reduction="micro")))
    assert ours["iou"] == ours["dice"] == float(smp.metrics.iou_score(*stats, reduction="micro-imagewise")) == 1.0


def test_classification_scores_have_known_values() -> None:
    labels = [True, True, False, False, False]
    scores = [0.9, 0.4, 0.6, 0.2, 0.1]
    result = metrics.classification_scores(labels, scores, threshold=0.5)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["sensitivity"] == pytest.approx(1 / 2)
    assert result["specificity"] == pytest.approx(2 / 3)
    assert result["balanced_accuracy"] == pytest.approx(7 / 12)
    assert result["auc"] == pytest.approx(5 / 6)
    assert metrics.classification_scores(labels, scores, threshold=0.3)["sensitivity"] == 1.0


def test_classification_threshold_is_inclusive_and_ties_count_half() -> None:
    assert metrics.classification_scores([True], [0.5], threshold=0.5)["sensitivity"] == 1.0
    assert metrics.roc_auc([True, False], [0.3, 0.3]) == 0.5
    assert metrics.roc_auc([True, False, False], [0.3, 0.3, 0.1]) == pytest.approx(0.75)


def test_all_negative_classification_is_defined() -> None:
    result = metrics.classification_scores([False, False], [0.1, 0.7], threshold=0.5)
    assert result == {"accuracy": 0.5, "balanced_accuracy": 0.75, "auc": 0.5, "sensitivity": 1.0, "specificity": 0.5}
    empty = metrics.classification_scores([], [], threshold=0.5)
    assert not any(math.isnan(value) for value in empty.values())


def test_roc_points_are_monotone_and_their_area_is_the_auc(rng: np.random.Generator) -> None:
    labels = rng.random(40) < 0.4
    scores = np.round(rng.random(40) + 0.3 * labels, 1)  # rounded: ties on purpose
    points = metrics.roc_curve_points(labels, scores)
    fpr = np.array([point["fpr"] for point in points])
    tpr = np.array([point["tpr"] for point in points])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.all(np.diff([point["threshold"] for point in points]) <= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(metrics.roc_auc(labels, scores))


@pytest.mark.parametrize("seed", range(8))
def test_auc_matches_scikit_learn_on_random_scores_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    count = int(rng.integers(5, 200))
    labels = rng.random(count) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]  # both classes present
    scores = np.round(rng.random(count) + rng.uniform(0.0, 0.5) * labels, int(rng.integers(0, 3)))  # many ties
    assert metrics.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_stays_defined_where_scikit_learn_refuses() -> None:
    # Why weakseg keeps its own rank statistic: scikit-learn raises on one class and on infinite scores.
    assert metrics.roc_auc([True, True], [0.2, 0.9]) == 0.5
    assert metrics.roc_auc([True, False, True], [math.inf, -math.inf, 0.3]) == 1.0
    assert math.isnan(metrics.roc_auc([True, False], [0.3, math.nan]))  # NaN scores give NaN, not an error


def test_roc_points_of_a_small_example() -> None:
    points = metrics.roc_curve_points([True, False, True], [0.8, 0.5, 0.3])
    assert [(p["fpr"], p["tpr"], p["threshold"]) for p in points] == [
        (0.0, 0.0, 1.0),
        (0.0, 0.5, 0.8),
        (1.0, 0.5, 0.5),
        (1.0, 1.0, 0.3),
    ]


def test_roc_points_of_one_class_end_at_one_one() -> None:
    points = metrics.roc_curve_points([False, False], [0.2, 0.6])
    assert points[-1] == {"fpr": 1.0, "tpr": 1.0, "threshold": 0.0}
    assert all(0.0 <= p["tpr"] <= 1.0 for p in points)


def test_confusion_rows_name_the_classes() -> None:
    rows = metrics.confusion_rows([True, False, True], [True, True, False], ("HP", "SSA"))
    assert rows == [
        {"actual": "SSA", "predicted": "SSA"},
        {"actual": "HP", "predicted": "SSA"},
        {"actual": "SSA", "predicted": "HP"},
    ]


def test_roc_end_thresholds_bracket_scores_outside_zero_one() -> None:
    # Scores such as predicted areas (pixels) or logits: the first point must predict nothing positive.
    points = metrics.roc_curve_points([True, False], [250.0, 40.0])
    assert points[0]["threshold"] > 250.0 and (points[0]["fpr"], points[0]["tpr"]) == (0.0, 0.0)
    assert metrics.roc_curve_points([True], [1.0])[0]["threshold"] > 1.0
    assert metrics.roc_curve_points([False, False], [-2.0, -1.0])[-1]["threshold"] <= -2.0


def test_balanced_accuracy_threshold_separates_shifted_scores() -> None:
    # Every score is above 0.5 (an uncalibrated head): 0.5 calls every tile positive, specificity 0.
    labels = [False, False, False, True, True, True]
    scores = [0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
    threshold = metrics.best_balanced_accuracy_threshold(labels, scores)
    assert threshold == pytest.approx(0.85)  # halfway between the highest negative and the lowest positive
    assert metrics.classification_scores(labels, scores, threshold)["balanced_accuracy"] == 1.0
    assert metrics.classification_scores(labels, scores, 0.5)["specificity"] == 0.0


def test_balanced_accuracy_threshold_of_an_unseparable_set() -> None:
    # Best balanced accuracy 5/6: cut at 0.35 (sensitivity 2/3, specificity 1) ...
    labels = [False, True, False, True, True]
    scores = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert metrics.best_balanced_accuracy_threshold(labels, scores) == pytest.approx(0.35)
    # ... and a tie, 0.75 at both cuts 0.1875 and 0.8125 (exactly as far from 0.5): the lower one wins.
    tied = metrics.best_balanced_accuracy_threshold([False, True, False, True], [0.125, 0.25, 0.75, 0.875])
    assert tied == 0.1875
    # A tie between cuts 0.15 and 0.35 (both 0.75): the one closer to 0.5.
    assert metrics.best_balanced_accuracy_threshold([False, True, False, True], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(
        0.35
    )


@pytest.mark.parametrize(
    ("labels", "scores", "reason"),
    [
        ([True, True], [0.7, 0.9], "only positive"),
        ([False, False], [0.7, 0.9], "only negative"),
        ([], [], "no tile"),
        ([False, True], [0.8, 0.8], "equal"),
        ([True, False], [0.2, 0.9], "chance"),  # perfectly inverted: no cut beats 0.5
    ],
)
def test_balanced_accuracy_threshold_falls_back_to_one_half_with_a_reason(
    labels: list[bool], scores: list[float], reason: str
) -> None:
    choice = metrics.choose_balanced_accuracy_threshold(labels, scores)
    assert choice.threshold == 0.5 and reason in choice.reason


def test_balanced_accuracy_threshold_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="2 labels but 1 scores"):
        metrics.choose_balanced_accuracy_threshold([True, False], [0.3])
    with pytest.raises(ValueError, match="finite"):
        metrics.choose_balanced_accuracy_threshold([True, False], [0.3, float("nan")])


# Twelve validation positives and three negatives: the imbalanced variant's shape (33 to 3 there).
SCARCE_NEGATIVE_LABELS = [True] * 12 + [False] * 3
SCARCE_NEGATIVE_SCORES = [0.9, 0.92, 0.95, 0.96, 0.97, 0.98, 0.99, 0.991, 0.992, 0.993, 0.994, 0.995, 0.05, 0.2, 0.3]


def test_auto_decision_rule_lets_the_abundant_positives_place_the_cut_where_negatives_are_scarce() -> None:
    # Balanced accuracy ties over every cut between 0.3 and 0.9 and takes the one nearest 0.5 (0.6); with three
    # negatives that is a guess, so auto cuts at the lowest validation positive: all 12 kept, no negative passed.
    by_balanced_accuracy = metrics.choose_decision_threshold(SCARCE_NEGATIVE_LABELS, SCARCE_NEGATIVE_SCORES)
    assert (by_balanced_accuracy.threshold, by_balanced_accuracy.rule) == (pytest.approx(0.6), "balanced_accuracy")
    auto = metrics.choose_decision_threshold(SCARCE_NEGATIVE_LABELS, SCARCE_NEGATIVE_SCORES, "auto", min_class_tiles=10)
    assert (auto.threshold, auto.rule, auto.reason) == (0.9, "lowest_validation_positive", "")
    at_cut = metrics.classification_scores(SCARCE_NEGATIVE_LABELS, SCARCE_NEGATIVE_SCORES, auto.threshold)
    assert at_cut["sensitivity"] == 1.0 and at_cut["specificity"] == 1.0


def test_auto_decision_rule_keeps_every_validation_positive_even_past_a_scarce_negative() -> None:
    # One of three negatives scores above three positives: balanced accuracy gives them up to call that one
    # negative right (a negative weighs four positives there); auto keeps every positive.
    labels = [True] * 12 + [False] * 3
    scores = [0.5, 0.55, 0.6, *[0.9] * 9, 0.1, 0.2, 0.7]
    assert metrics.choose_decision_threshold(labels, scores).threshold == pytest.approx(0.8)
    auto = metrics.choose_decision_threshold(labels, scores, "auto")
    assert auto.threshold == 0.5 and auto.rule == "lowest_validation_positive"


def test_auto_decision_rule_lets_the_abundant_negatives_place_the_cut_where_positives_are_scarce() -> None:
    labels = [False] * 12 + [True] * 2
    scores = [0.01 * index for index in range(12)] + [0.6, 0.9]
    auto = metrics.choose_decision_threshold(labels, scores, "auto")
    assert auto.rule == "above_highest_validation_negative"
    assert 0.11 < auto.threshold < 0.11 + 1e-12  # just above the highest negative: it is called negative
    assert metrics.classification_scores(labels, scores, auto.threshold)["specificity"] == 1.0


@pytest.mark.parametrize(
    ("positives", "negatives"),
    [(10, 10), (3, 4), (12, 0)],  # both classes enough, both scarce, one class missing (0.5 with its reason)
)
def test_auto_decision_rule_is_balanced_accuracy_unless_exactly_one_class_is_scarce(
    positives: int, negatives: int
) -> None:
    labels = [True] * positives + [False] * negatives
    scores = list(np.linspace(0.55, 0.99, positives)) + list(np.linspace(0.01, 0.45, negatives))
    auto = metrics.choose_decision_threshold(labels, scores, "auto")
    assert auto == metrics.choose_balanced_accuracy_threshold(labels, scores)


def test_decision_rule_is_recorded_and_an_unknown_one_refused() -> None:
    record = metrics.calibrate_threshold(SCARCE_NEGATIVE_LABELS, SCARCE_NEGATIVE_SCORES, "auto").record()
    assert record["rule"] == "lowest_validation_positive" and record["threshold"] == 0.9
    assert record["specificity"] == 1.0
    with pytest.raises(ValueError, match="decision rule 'best'"):
        metrics.choose_decision_threshold([True, False], [0.9, 0.1], "best")
