"""Segmentation and classification metrics.

Segmentation metrics are pooled: confusion counts are summed over every pixel of every tile (negative
tiles included, so false positives on them count) before the ratio is taken. Every metric is defined on
empty inputs (an empty prediction of an empty truth scores 1.0, never NaN). Pooled IoU and Dice equal
segmentation_models_pytorch's ``get_stats`` + ``iou_score`` / ``f1_score`` with ``reduction="micro"``
(tested), except there: smp's pooled ratio is NaN when no pixel is foreground in prediction or truth.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Per-tile labels, or scores: a sequence or a 1-D array (the functions read either through ``np.asarray``).
Labels = Sequence[bool] | np.ndarray
Scores = Sequence[float] | np.ndarray


@dataclass
class PixelCounts:
    """Confusion counts of foreground pixels, summed over tiles."""

    true_positive: int = 0
    false_positive: int = 0
    false_negative: int = 0
    true_negative: int = 0

    def add(self, prediction: np.ndarray, truth: np.ndarray, where: np.ndarray | None = None) -> PixelCounts:
        """Adds one tile's pixels (boolean arrays of one shape), optionally only inside ``where``."""
        prediction, truth = _as_bool(prediction), _as_bool(truth)
        if prediction.shape != truth.shape:
            raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
        if where is not None:
            where = _as_bool(where)
            prediction, truth = prediction[where], truth[where]
        self.true_positive += int(np.count_nonzero(prediction & truth))
        self.false_positive += int(np.count_nonzero(prediction & ~truth))
        self.false_negative += int(np.count_nonzero(~prediction & truth))
        self.true_negative += int(np.count_nonzero(~prediction & ~truth))
        return self

    @property
    def iou(self) -> float:
        """Foreground IoU; 1.0 when neither prediction nor truth has foreground."""
        return _ratio(self.true_positive, self.true_positive + self.false_positive + self.false_negative)

    @property
    def dice(self) -> float:
        """Foreground Dice; 1.0 when neither prediction nor truth has foreground."""
        return _ratio(2 * self.true_positive, 2 * self.true_positive + self.false_positive + self.false_negative)

    @property
    def background_iou(self) -> float:
        """Background IoU; 1.0 when neither has background."""
        return _ratio(self.true_negative, self.true_negative + self.false_positive + self.false_negative)

    @property
    def miou(self) -> float:
        """Mean of background and foreground IoU."""
        return (self.iou + self.background_iou) / 2.0


def _as_bool(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array if array.dtype == bool else array > 0


def _ratio(numerator: float, denominator: float) -> float:
    return 1.0 if denominator == 0 else float(numerator) / float(denominator)


def tile_iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Foreground IoU of one tile (1.0 if both are empty)."""
    return PixelCounts().add(prediction, truth).iou


def tile_dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Foreground Dice of one tile (1.0 if both are empty)."""
    return PixelCounts().add(prediction, truth).dice


def segmentation_scores(
    predictions: Iterable[np.ndarray],
    truths: Iterable[np.ndarray],
    positives: Labels,
) -> dict[str, float]:
    """The pipeline's segmentation metrics over a set of tiles.

    Args:
        predictions: boolean masks, one per tile.
        truths: boolean masks, one per tile.
        positives: whether each tile's image label is positive.

    Returns:
        ``iou``, ``dice``, ``miou`` pooled over all pixels of all tiles, and ``iou_positive_mean``, the mean
        per-tile foreground IoU over positive tiles (the paper's protocol; 0.0 with no positive tile, as
        there is nothing to average, and reported with ``positive_tiles`` so a reader can tell).
    """
    pooled = PixelCounts()
    per_tile: list[float] = []
    count = 0
    for prediction, truth, positive in zip(predictions, truths, positives, strict=True):
        pooled.add(prediction, truth)
        count += 1
        if positive:
            per_tile.append(tile_iou(prediction, truth))
    return {
        "iou": pooled.iou,
        "dice": pooled.dice,
        "miou": pooled.miou,
        "iou_positive_mean": float(np.mean(per_tile)) if per_tile else 0.0,
        "positive_tiles": len(per_tile),
        "tiles": count,
    }


def roc_auc(labels: Labels, scores: Scores) -> float:
    """Area under the ROC curve (rank statistic, ties counted half); 0.5 when only one class is present.

    Equal to scikit-learn's ``roc_auc_score`` wherever that is defined (tested); kept because it is also
    defined where scikit-learn raises: one class only, and infinite scores (ranked like any other). A NaN
    score gives NaN.
    """
    labels_array = np.asarray(labels, dtype=bool)
    scores_array = np.asarray(scores, dtype=np.float64)
    positives = int(labels_array.sum())
    negatives = int((~labels_array).sum())
    if positives == 0 or negatives == 0:
        return 0.5
    from scipy.stats import rankdata  # average ranks handle ties

    ranks = rankdata(scores_array)
    rank_sum = float(ranks[labels_array].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def roc_curve_points(labels: Labels, scores: Scores) -> list[dict[str, float]]:
    """ROC points ``{"fpr", "tpr", "threshold"}`` from the highest threshold down, for ``dvc plots``."""
    labels_array = np.asarray(labels, dtype=bool)
    scores_array = np.asarray(scores, dtype=np.float64)
    positives = max(int(labels_array.sum()), 1)
    negatives = max(int((~labels_array).sum()), 1)
    # The first point's threshold lies above every score (nothing predicted positive) and the last one's
    # at or below every score; 1.0 and 0.0 where that holds, as for probabilities.
    highest = float(np.nextafter(scores_array.max(), np.inf)) if scores_array.size else 1.0
    lowest = float(scores_array.min()) if scores_array.size else 0.0
    points = [{"fpr": 0.0, "tpr": 0.0, "threshold": max(1.0, highest)}]
    for threshold in np.unique(scores_array)[::-1]:
        predicted = scores_array >= threshold
        points.append(
            {
                "fpr": float(np.count_nonzero(predicted & ~labels_array) / negatives),
                "tpr": float(np.count_nonzero(predicted & labels_array) / positives),
                "threshold": float(threshold),
            }
        )
    if points[-1]["fpr"] != 1.0 or points[-1]["tpr"] != 1.0:
        points.append({"fpr": 1.0, "tpr": 1.0, "threshold": min(0.0, lowest)})
    return points


def classification_scores(labels: Labels, scores: Scores, threshold: float = 0.5) -> dict[str, float]:
    """Tile-level metrics of a binary decision.

    Args:
        labels: true labels (positive = True).
        scores: predicted probabilities of the positive class.
        threshold: a tile is predicted positive when its score is >= threshold.

    Returns:
        ``accuracy``, ``balanced_accuracy``, ``auc``, ``sensitivity``, ``specificity``. Sensitivity
        (specificity) is 1.0 when there is no positive (negative) tile to miss, so values stay defined.
    """
    labels_array = np.asarray(labels, dtype=bool)
    predicted = np.asarray(scores, dtype=np.float64) >= threshold
    true_positive = int(np.count_nonzero(predicted & labels_array))
    true_negative = int(np.count_nonzero(~predicted & ~labels_array))
    sensitivity = _ratio(true_positive, int(labels_array.sum()))
    specificity = _ratio(true_negative, int((~labels_array).sum()))
    return {
        "accuracy": _ratio(true_positive + true_negative, len(labels_array)),
        "balanced_accuracy": (sensitivity + specificity) / 2.0,
        "auc": roc_auc(labels_array, scores),
        "sensitivity": sensitivity,
        "specificity": specificity,
    }


def confusion_rows(labels: Labels, predicted: Labels, names: tuple[str, str]) -> list[dict[str, str]]:
    """One row per tile ``{"actual", "predicted"}`` with class names, the format of ``dvc plots`` confusion."""
    negative_name, positive_name = names
    return [
        {"actual": positive_name if actual else negative_name, "predicted": positive_name if guess else negative_name}
        for actual, guess in zip(labels, predicted, strict=True)
    ]


@dataclass(frozen=True)
class ThresholdChoice:
    """A decision threshold chosen on labelled scores, with why where it is the 0.5 fallback.

    Attributes:
        threshold: predict positive when ``score >= threshold``.
        reason: empty when the threshold was chosen from the scores; otherwise why 0.5 was kept.
        rule: what placed it: ``balanced_accuracy``, ``lowest_validation_positive`` or
            ``above_highest_validation_negative`` (see :func:`choose_decision_threshold`).
    """

    threshold: float
    reason: str = ""
    rule: str = "balanced_accuracy"


FALLBACK_THRESHOLD = 0.5
#: The rules of :func:`choose_decision_threshold`.
DECISION_RULES = ("auto", "balanced_accuracy")
#: With fewer validation tiles than this of one class, ``auto`` lets the other class place the cut.
MIN_CLASS_TILES_FOR_BALANCED_ACCURACY = 10


def choose_balanced_accuracy_threshold(labels: Labels, scores: Scores) -> ThresholdChoice:
    """The threshold of highest balanced accuracy on ``(labels, scores)`` (e.g. a validation split).

    Candidates are the midpoints between consecutive distinct scores (a cut halfway between the last tile
    called negative and the first called positive, not on a tile's own score). Ties in balanced accuracy
    (compared exactly, in integer arithmetic) go to the candidate closest to 0.5, then to the lower one,
    so the answer is deterministic and departs from the usual 0.5 no more than the data ask for.

    0.5 is kept, with the reason, when nothing can be learnt: no tile, one class only, or no cut better
    than chance (every cut's balanced accuracy <= 0.5, e.g. all scores equal).

    Args:
        labels: true labels (positive = True).
        scores: finite scores of the positive class, one per label.

    Returns:
        The choice; ``threshold`` is a Python float.

    Raises:
        ValueError: if the lengths differ or a score is not finite.
    """
    labels_array = np.asarray(labels, dtype=bool).reshape(-1)
    scores_array = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels_array.shape != scores_array.shape:
        raise ValueError(f"{labels_array.size} labels but {scores_array.size} scores")
    if not np.all(np.isfinite(scores_array)):
        raise ValueError("scores must be finite")
    positives = int(labels_array.sum())
    negatives = int(labels_array.size - positives)
    if positives == 0 or negatives == 0:
        which = "no tile" if labels_array.size == 0 else ("only negative" if positives == 0 else "only positive")
        return ThresholdChoice(FALLBACK_THRESHOLD, f"{which} tiles to choose a threshold on; kept 0.5")
    distinct = np.unique(scores_array)
    if distinct.size < 2:
        return ThresholdChoice(FALLBACK_THRESHOLD, "every score is equal; kept 0.5")
    # Cut k lies between distinct[k - 1] and distinct[k]: tiles scoring >= distinct[k] are called positive.
    cuts = (distinct[:-1] + distinct[1:]) / 2.0
    cuts = np.where(cuts > distinct[:-1], cuts, distinct[1:])  # adjacent floats: the midpoint rounds down
    true_positive = positives - np.searchsorted(np.sort(scores_array[labels_array]), distinct[1:], side="left")
    true_negative = np.searchsorted(np.sort(scores_array[~labels_array]), distinct[1:], side="left")
    # Balanced accuracy times 2 * positives * negatives: exact integers, so ties are ties.
    merit = true_positive.astype(np.int64) * negatives + true_negative.astype(np.int64) * positives
    best = int(merit.max())
    if best <= positives * negatives:  # balanced accuracy <= 0.5
        return ThresholdChoice(FALLBACK_THRESHOLD, "no threshold does better than chance; kept 0.5")
    tied = cuts[merit == best]
    distance = np.abs(tied - FALLBACK_THRESHOLD)
    return ThresholdChoice(float(tied[distance == distance.min()].min()))


def choose_decision_threshold(
    labels: Labels,
    scores: Scores,
    rule: str = "balanced_accuracy",
    min_class_tiles: int = MIN_CLASS_TILES_FOR_BALANCED_ACCURACY,
) -> ThresholdChoice:
    """A tile decision threshold on validation ``(labels, scores)`` by ``rule``.

    ``balanced_accuracy`` is :func:`choose_balanced_accuracy_threshold`. ``auto`` is the same while each class
    has at least ``min_class_tiles`` tiles. Where one class has fewer (and the other enough), those few say
    little about where the class's unseen tiles score: a classifier that trained on a few dozen such tiles
    scores the ones like them far from the cut and new ones nearer, and balanced accuracy weighs each of the few
    as much as many tiles of the other class. The abundant class then places the cut alone: at the lowest
    validation positive's score where negatives are scarce (every validation positive kept, as few negatives
    passed as that allows), just above the highest validation negative's where positives are scarce.

    Args:
        labels: true labels (positive = True).
        scores: finite scores of the positive class, one per label.
        rule: ``auto`` or ``balanced_accuracy``.
        min_class_tiles: the fewest tiles of a class for ``auto`` to trust its scores.

    Returns:
        The choice, with the rule that placed it.

    Raises:
        ValueError: on an unknown rule, lengths that differ or a score that is not finite.
    """
    if rule not in DECISION_RULES:
        raise ValueError(f"decision rule {rule!r}: expected one of {', '.join(DECISION_RULES)}")
    choice = choose_balanced_accuracy_threshold(labels, scores)
    if rule == "balanced_accuracy" or choice.reason:
        return choice
    labels_array = np.asarray(labels, dtype=bool).reshape(-1)
    scores_array = np.asarray(scores, dtype=np.float64).reshape(-1)
    positives = int(labels_array.sum())
    negatives = int(labels_array.size - positives)
    if negatives < min_class_tiles <= positives:
        return ThresholdChoice(float(scores_array[labels_array].min()), rule="lowest_validation_positive")
    if positives < min_class_tiles <= negatives:
        highest_negative = float(scores_array[~labels_array].max())
        return ThresholdChoice(float(np.nextafter(highest_negative, np.inf)), rule="above_highest_validation_negative")
    return choice


def best_balanced_accuracy_threshold(labels: Labels, scores: Scores) -> float:
    """The threshold of :func:`choose_balanced_accuracy_threshold` (0.5 where it falls back)."""
    return choose_balanced_accuracy_threshold(labels, scores).threshold


@dataclass(frozen=True)
class ThresholdCalibration:
    """A tile decision threshold chosen on the validation split, and the scores there at it.

    Used for the classifier's ``decision_threshold`` and the segmenter head's ``head_threshold``.

    Attributes:
        threshold: a tile is positive when its probability is ``>= threshold``.
        reason: empty when the threshold was chosen on validation; otherwise why 0.5 was kept.
        metrics: ``accuracy``, ``balanced_accuracy``, ``auc``, ``sensitivity``, ``specificity`` on the
            validation split at ``threshold``.
        rule: what placed it (:attr:`ThresholdChoice.rule`).
    """

    threshold: float
    reason: str
    metrics: dict[str, float]
    rule: str = "balanced_accuracy"

    def record(self) -> dict[str, Any]:
        """The metrics-file entry: the threshold, the rule that placed it, the metrics, and the reason if any."""
        record: dict[str, Any] = {"threshold": self.threshold, "rule": self.rule, **self.metrics}
        if self.reason:
            record["threshold_reason"] = self.reason
        return record


def calibrate_threshold(labels: Labels, probabilities: Scores, rule: str = "balanced_accuracy") -> ThresholdCalibration:
    """:func:`choose_decision_threshold` on validation scores, with the scores at the chosen cut."""
    choice = choose_decision_threshold(labels, probabilities, rule)
    return ThresholdCalibration(
        threshold=choice.threshold,
        reason=choice.reason,
        metrics=classification_scores(labels, probabilities, choice.threshold),
        rule=choice.rule,
    )
