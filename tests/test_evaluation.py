"""Tests of weakseg.evaluation: the rows of metrics/evaluate.json, their gates, ROC and confusion data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from weakseg import evaluation
from weakseg.data.layout import Tile

TILE = 32


def _square(offset: int) -> np.ndarray:
    mask = np.zeros((TILE, TILE), dtype=bool)
    mask[offset : offset + 12, offset : offset + 14] = True
    return mask


def _record(positive: bool, area: int, head: float, classifier: float) -> evaluation.TestTile:
    prediction = np.zeros((10, 10), dtype=bool)
    prediction.flat[:area] = True
    label = "SSA" if positive else "HP"
    return evaluation.TestTile(
        tile=Tile(f"{label}{area}.png", label, "test", positive),
        prediction=prediction,
        pseudo=prediction.copy(),
        cam_mask=prediction.copy(),
        tissue=np.ones((10, 10), dtype=bool),
        truth=None,
        classifier_probability=classifier,
        head_probability=head,
    )


def test_tile_decisions_from_area_and_head_have_known_answers() -> None:
    # Positives with 30 and 5 predicted pixels, negatives with 0 and 11: "above 10 px" calls 30 and 11.
    records = [
        _record(True, 30, 0.9, 0.8),
        _record(True, 5, 0.2, 0.7),
        _record(False, 0, 0.1, 0.6),
        _record(False, 11, 0.6, 0.1),
    ]
    result = evaluation.compute_metrics(records, threshold=0.5, min_foreground_pixels=10, has_truth=False)
    area = result["segmenter_tile"]["area"]
    assert (area["sensitivity"], area["specificity"], area["accuracy"]) == (0.5, 0.5, 0.5)
    assert area["auc"] == pytest.approx(0.75)  # pairs: 30>0, 30>11, 5>0, 5<11
    head = result["segmenter_tile"]["head"]
    assert (head["sensitivity"], head["specificity"]) == (0.5, 0.5)
    classifier = result["classifier"]
    assert (classifier["sensitivity"], classifier["specificity"], classifier["auc"]) == (1.0, 0.5, 1.0)
    # The pseudo-mask reference is gated by the label: the 11 px predicted on the negative tile are false
    # positives even where that tile's (ungated) refined mask holds them; the positives match exactly.
    assert result["segmenter"]["vs_pseudo"]["iou"] == pytest.approx(35 / (35 + 11))
    # The trivial baseline paints all tissue (100 px) on the classifier's positives, the first three tiles:
    # it covers the 30 + 5 px of the label-gated pseudo-masks (the negative fourth tile's reference is
    # empty), so IoU = 35 / 300.
    baseline = result["baseline"]["tissue_if_classified_positive"]["vs_pseudo"]
    assert baseline["iou"] == pytest.approx(35 / 300)


def test_figure_selection_is_seeded_and_balanced() -> None:
    tiles = [Tile(f"t{i:02d}.png", "SSA" if i % 3 == 0 else "HP", "test", i % 3 == 0) for i in range(30)]
    first = evaluation.figure_selection(tiles, 4, seed=3)
    assert first == evaluation.figure_selection(list(reversed(tiles)), 4, seed=3)
    assert [tile.positive for tile in first] == [True] * 4 + [False] * 4
    assert first != evaluation.figure_selection(tiles, 4, seed=4)
    assert len(evaluation.figure_selection(tiles[:2], 4, seed=0)) == 2  # fewer tiles than asked: all of them


def test_head_decisions_use_the_checkpoint_threshold() -> None:
    # Head probabilities 0.9 and 0.2 on positives, 0.1 and 0.6 on negatives: 0.5 calls the 0.6 negative
    # positive; the stored 0.65 does not.
    empty = np.zeros((10, 10), dtype=bool)
    records = [
        evaluation.TestTile(
            tile=Tile(f"t{index}.png", "SSA" if positive else "HP", "test", positive),
            prediction=empty,
            pseudo=empty,
            cam_mask=empty,
            tissue=~empty,
            truth=None,
            classifier_probability=classifier,
            head_probability=head,
        )
        for index, (positive, head, classifier) in enumerate(
            [(True, 0.9, 0.8), (True, 0.2, 0.7), (False, 0.1, 0.6), (False, 0.6, 0.1)]
        )
    ]
    head = evaluation.compute_metrics(records, 0.5, 10, has_truth=False, head_threshold=0.65)["segmenter_tile"]["head"]
    assert (head["sensitivity"], head["specificity"], head["threshold"]) == (0.5, 1.0, 0.65)
    # The classifier keeps evaluate.threshold.
    classifier = evaluation.compute_metrics(records, 0.5, 10, has_truth=False, head_threshold=0.65)["classifier"]
    assert classifier["specificity"] == 0.5


def _gated_record(
    name: str, positive: bool, truth: np.ndarray, cam_mask: np.ndarray, classifier_probability: float
) -> evaluation.TestTile:
    return evaluation.TestTile(
        tile=Tile(name, "SSA" if positive else "HP", "test", positive),
        prediction=truth.copy(),
        pseudo=cam_mask.copy(),
        cam_mask=cam_mask,
        tissue=np.ones((TILE, TILE), dtype=bool),
        truth=truth,
        classifier_probability=classifier_probability,
        head_probability=0.5,
    )


def test_cam_and_pseudo_rows_are_gated_by_the_classifier_not_the_label() -> None:
    empty = np.zeros((TILE, TILE), dtype=bool)
    lesion = _square(4)
    false_alarm = _square(10)
    records = [
        _gated_record("p.png", True, lesion, lesion, 0.9),
        # A negative tile whose CAM lights up and which the classifier calls positive: a false positive the
        # pipeline would output at test time, so the fair rows must count it.
        _gated_record("n1.png", False, empty, false_alarm, 0.8),
        # Called negative by the classifier: gated out, its CAM costs nothing.
        _gated_record("n2.png", False, empty, false_alarm, 0.2),
    ]
    result = evaluation.compute_metrics(records, threshold=0.5, min_foreground_pixels=10, has_truth=True)
    lesion_pixels = int(lesion.sum())
    expected = lesion_pixels / (lesion_pixels + int(false_alarm.sum()))
    for row in ("cam", "pseudo"):
        assert result[row]["vs_truth"]["iou"] == pytest.approx(expected)
        assert result[f"{row}_oracle_label"]["vs_truth"]["iou"] == 1.0
    assert result["tiles"]["classified_positive"] == 2
    # The tissue baselines: the classifier's two positive calls, or the one truly positive tile.
    tissue = TILE * TILE
    assert result["baseline"]["tissue_if_classified_positive"]["vs_truth"]["iou"] == pytest.approx(
        lesion_pixels / (2 * tissue)
    )
    assert result["baseline"]["tissue_if_label_positive_oracle_label"]["vs_truth"]["iou"] == pytest.approx(
        lesion_pixels / tissue
    )
    # The segmenter's pseudo-mask reference is gated by the label: the negative tiles' masks are empty.
    assert result["segmenter"]["vs_pseudo"]["iou"] == 1.0


def test_classifier_decisions_and_gates_use_the_classifier_threshold() -> None:
    empty = np.zeros((TILE, TILE), dtype=bool)
    lesion = _square(4)
    # Classifier probability 0.7: positive at the pixel threshold 0.5, negative at the stored 0.8.
    records = [
        _gated_record("p.png", True, lesion, lesion, 0.7),
        _gated_record("n.png", False, empty, _square(10), 0.2),
    ]
    result = evaluation.compute_metrics(
        records, threshold=0.5, min_foreground_pixels=10, has_truth=True, classifier_threshold=0.8
    )
    assert result["classifier"]["threshold"] == 0.8
    assert (result["classifier"]["sensitivity"], result["tiles"]["classified_positive"]) == (0.0, 0)
    for row in ("cam", "pseudo"):  # gated out: nothing predicted
        assert result[row]["vs_truth"]["iou"] == 0.0
        assert result[f"{row}_oracle_label"]["vs_truth"]["iou"] == 1.0
    assert result["segmenter_classifier_gated"]["vs_truth"]["iou"] == 0.0
    # Without a classifier threshold, evaluate.threshold decides (as before).
    default = evaluation.compute_metrics(records, threshold=0.5, min_foreground_pixels=10, has_truth=True)
    assert (default["classifier"]["threshold"], default["tiles"]["classified_positive"]) == (0.5, 1)


def test_gate_empties_the_masks_of_tiles_not_kept() -> None:
    masks = [np.ones((2, 2), dtype=bool), np.ones((2, 2), dtype=bool)]
    gated = evaluation.gate(masks, [True, False])
    assert gated[0] is masks[0]
    assert gated[1].dtype == bool and not gated[1].any() and masks[1].all()
    with pytest.raises(ValueError):
        evaluation.gate(masks, [True])


def _roc_records() -> list[evaluation.TestTile]:
    # Positives with 30 and 5 predicted pixels, negatives with 0 and 11 (see the area test above).
    return [
        _record(True, 30, 0.9, 0.8),
        _record(True, 5, 0.2, 0.7),
        _record(False, 0, 0.1, 0.6),
        _record(False, 11, 0.6, 0.1),
    ]


def test_tile_roc_curves_follow_the_three_decisions_with_their_aucs() -> None:
    records = _roc_records()
    result = evaluation.compute_metrics(records, threshold=0.5, min_foreground_pixels=10, has_truth=False)
    curves = evaluation.tile_roc_curves(records, result)
    assert [(name, auc) for name, _, auc in curves] == [
        ("classifier", 1.0),
        ("segmenter head", result["segmenter_tile"]["head"]["auc"]),
        ("segmenter area", pytest.approx(0.75)),
    ]
    for _, points, _ in curves:
        assert (points[0]["fpr"], points[0]["tpr"]) == (0.0, 0.0)
        assert (points[-1]["fpr"], points[-1]["tpr"]) == (1.0, 1.0)


def test_confusion_rows_name_the_classes_and_decide_at_the_classifier_threshold() -> None:
    records = _roc_records()  # classifier probabilities 0.8, 0.7 (positives), 0.6, 0.1 (negatives)
    rows = evaluation.confusion_rows(records, 0.65, "SSA")
    assert rows == [
        {"actual": "SSA", "predicted": "SSA"},
        {"actual": "SSA", "predicted": "SSA"},
        {"actual": "HP", "predicted": "HP"},
        {"actual": "HP", "predicted": "HP"},
    ]
    # Negatives of several labels are named after the positive one.
    records[3].tile = Tile("x.png", "NORMAL", "test", False)
    assert {row["actual"] for row in evaluation.confusion_rows(records, 0.65, "SSA")} == {"SSA", "not SSA"}


def test_plot_data_csvs_have_fixed_bytes(tmp_path: Path) -> None:
    records = _roc_records()
    result = evaluation.compute_metrics(records, threshold=0.5, min_foreground_pixels=10, has_truth=False)
    curves = evaluation.tile_roc_curves(records, result)
    evaluation.write_roc_csv(tmp_path / "roc.csv", curves[0])
    lines = (tmp_path / "roc.csv").read_text().split("\n")
    assert lines[0] == "fpr,tpr,threshold" and lines[-1] == ""
    assert len(lines) == len(curves[0][1]) + 2
    evaluation.write_confusion_csv(tmp_path / "confusion.csv", records, 0.65, "SSA")
    assert (tmp_path / "confusion.csv").read_bytes() == b"actual,predicted\nSSA,SSA\nSSA,SSA\nHP,HP\nHP,HP\n"


def test_the_head_gate_row_empties_the_masks_of_tiles_the_head_calls_negative_at_its_threshold() -> None:
    """A false alarm on a negative tile whose head probability is below the head's threshold is gated out;
    a positive tile above it keeps its mask; the classifier plays no part."""
    empty = np.zeros((TILE, TILE), dtype=bool)
    lesion = _square(4)
    false_alarm = _square(10)
    positive = _gated_record("p.png", True, lesion, lesion, 0.1)
    negative = _gated_record("n.png", False, empty, empty, 0.9)
    negative.prediction = false_alarm.copy()
    positive.head_probability, negative.head_probability = 0.7, 0.4
    records = [positive, negative]
    lesion_pixels = int(lesion.sum())
    at_half = evaluation.compute_metrics(
        records, threshold=0.5, min_foreground_pixels=10, has_truth=True, head_threshold=0.5
    )
    assert at_half["segmenter_head_gated"]["vs_truth"]["iou"] == 1.0
    assert at_half["segmenter_ungated"]["vs_truth"]["iou"] == pytest.approx(
        lesion_pixels / (lesion_pixels + int(false_alarm.sum()))
    )
    # A head threshold above both tiles' probabilities empties both masks.
    strict = evaluation.compute_metrics(
        records, threshold=0.5, min_foreground_pixels=10, has_truth=True, head_threshold=0.8
    )
    assert strict["segmenter_head_gated"]["vs_truth"]["iou"] == 0.0
    # A threshold below both keeps both masks: the row is the ungated one.
    lenient = evaluation.compute_metrics(
        records, threshold=0.5, min_foreground_pixels=10, has_truth=True, head_threshold=0.3
    )
    assert lenient["segmenter_head_gated"]["vs_truth"] == lenient["segmenter_ungated"]["vs_truth"]


def test_the_filled_tissue_baseline_adds_the_holes_the_tissue_encloses() -> None:
    truth = _square(4)  # a lesion outlined as a region, its lumen included
    tissue = np.ones((TILE, TILE), dtype=bool)
    tissue[8:12, 8:12] = False  # the lumen: glass inside the tissue
    record = evaluation.TestTile(
        tile=Tile("p.png", "SSA", "test", True),
        prediction=truth & tissue,
        pseudo=truth.copy(),
        cam_mask=truth.copy(),
        tissue=tissue,
        truth=truth,
        classifier_probability=0.9,
        head_probability=0.9,
    )
    baseline = evaluation.compute_metrics([record], 0.5, 10, has_truth=True)["baseline"]
    lumen = 16
    tissue_iou = baseline["tissue_if_classified_positive"]["vs_truth"]["iou"]
    filled_iou = baseline["tissue_holes_filled_if_classified_positive"]["vs_truth"]["iou"]
    assert tissue_iou == pytest.approx((truth.sum() - lumen) / (TILE * TILE))
    assert filled_iou == pytest.approx(truth.sum() / (TILE * TILE))


# ------------------------------------------------------------------ the gate of both models
def test_the_joint_gate_probability_is_the_lower_of_the_two_models() -> None:
    assert evaluation.joint_gate_probability(0.9, 0.2) == 0.2
    assert evaluation.joint_gate_probability(0.3, 0.8) == 0.3
    probabilities = {"classifier": 0.9, "head": 0.4}
    assert evaluation.gate_probability(probabilities, "classifier") == 0.9
    assert evaluation.gate_probability(probabilities, "head") == 0.4
    assert evaluation.gate_probability(probabilities, evaluation.CLASSIFIER_AND_HEAD) == 0.4


def test_the_joint_cut_stops_a_negative_that_one_model_mistakes() -> None:
    """Scarce negatives (auto): the cut is the lowest validation positive's lower probability, 0.8 here.
    A negative the classifier scores 0.95 passes the classifier's own cut (0.85) but not the joint one,
    since the head gives it 0.3."""
    positives = [(0.85, 0.99), (0.9, 0.8), (0.97, 0.95)] * 4  # 12 positives: enough to place the cut alone
    negatives = [(0.1, 0.2), (0.2, 0.1)]  # 2 negatives: too few for balanced accuracy under auto
    labels = [True] * len(positives) + [False] * len(negatives)
    classifier = [pair[0] for pair in positives + negatives]
    head = [pair[1] for pair in positives + negatives]
    joint = evaluation.choose_joint_gate_threshold(labels, classifier, head, "auto")
    alone = evaluation.choose_joint_gate_threshold(labels, classifier, classifier, "auto")
    assert (joint.threshold, joint.rule) == (0.8, "lowest_validation_positive")
    assert alone.threshold == 0.85  # the classifier's own cut (its probability twice: the minimum is itself)
    unseen_negative = {"classifier": 0.95, "head": 0.3}
    assert evaluation.gate_probability(unseen_negative, "classifier") >= alone.threshold
    assert evaluation.gate_probability(unseen_negative, evaluation.CLASSIFIER_AND_HEAD) < joint.threshold
    # Balanced accuracy where both classes are plentiful: the cut separates the lower probabilities.
    labels = [True] * 10 + [False] * 10
    classifier = [0.9] * 10 + [0.95] * 5 + [0.1] * 5  # five negatives the classifier mistakes...
    head = [0.8] * 10 + [0.2] * 10  # ...which the head does not
    balanced = evaluation.choose_joint_gate_threshold(labels, classifier, head, "balanced_accuracy")
    assert 0.2 < balanced.threshold <= 0.8
    with pytest.raises(ValueError):
        evaluation.choose_joint_gate_threshold([True, False], [0.5, 0.4], [0.3], "auto")


def test_metrics_gain_the_joint_gate_rows_only_when_it_has_a_cut() -> None:
    """Tiles: two positives both models pass, a negative the classifier mistakes (0.95, the head 0.2) and a
    negative both reject. At a joint cut of 0.5 the two positives pass, and the mistaken negative does not."""
    truth = np.zeros((10, 10), dtype=bool)
    truth[:5] = True  # 50 px of lesion on each positive tile
    empty = np.zeros((10, 10), dtype=bool)
    everything = np.ones((10, 10), dtype=bool)
    records = [
        evaluation.TestTile(
            tile=Tile(f"t{index}.png", "SSA" if positive else "HP", "test", positive),
            prediction=truth.copy() if positive else everything.copy(),
            pseudo=empty,
            cam_mask=empty,
            tissue=everything,
            truth=truth.copy() if positive else empty.copy(),
            classifier_probability=classifier,
            head_probability=head,
        )
        for index, (positive, classifier, head) in enumerate(
            [(True, 0.9, 0.9), (True, 0.6, 0.7), (False, 0.95, 0.2), (False, 0.1, 0.1)]
        )
    ]
    without = evaluation.compute_metrics(records, 0.5, 10, has_truth=True, classifier_threshold=0.5)
    assert "classifier_and_head" not in without and "segmenter_classifier_and_head_gated" not in without
    assert "tissue_if_classifier_and_head_positive" not in without["baseline"]
    result = evaluation.compute_metrics(records, 0.5, 10, has_truth=True, classifier_threshold=0.5, joint_threshold=0.5)
    decision = result["classifier_and_head"]
    assert (decision["threshold"], decision["sensitivity"], decision["specificity"]) == (0.5, 1.0, 1.0)
    # Kept: the positives' 2 x 50 exact pixels.
    assert result["segmenter_classifier_and_head_gated"]["vs_truth"]["iou"] == pytest.approx(1.0)
    # The classifier alone also keeps the negative it mistakes, whose 100 px are all false.
    assert result["segmenter_classifier_gated"]["vs_truth"]["iou"] == pytest.approx(100 / 200)
    # All tissue (2 x 100 px) on the two tiles passed: 100 px of lesion.
    assert result["baseline"]["tissue_if_classifier_and_head_positive"]["vs_truth"]["iou"] == pytest.approx(100 / 200)
    assert result["baseline"]["tissue_if_classified_positive"]["vs_truth"]["iou"] == pytest.approx(100 / 300)
