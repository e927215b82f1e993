"""The numbers of the ``evaluate`` stage: every row of ``metrics/evaluate.json`` from the scored test tiles.

Every row scores what the pipeline itself would output at test time: the thresholded CAM, the refined
pseudo-mask and the trivial tissue baseline of a test tile count only where the classifier calls the tile
positive (its label is not known at test time). Rows ending in ``_oracle_label`` gate by the true label
instead, to show what the classifier's mistakes cost. The segmenter's ``vs_pseudo`` reference is the
pseudo-mask gated by the label (the paper's protocol).

Arrays in, dicts out; :func:`write_roc_csv` and :func:`write_confusion_csv` write the ``dvc plots`` data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from weakseg import metrics
from weakseg.data.layout import Tile
from weakseg.errors import UserInputError
from weakseg.io import write_csv
from weakseg.refine import fill_enclosed_holes

ROC_COLUMNS = ("fpr", "tpr", "threshold")
CONFUSION_COLUMNS = ("actual", "predicted")

# evaluate.segmenter_gate's value for the gate of both models (see joint_gate_probability).
CLASSIFIER_AND_HEAD = "classifier_and_head"

# One tile-level decision's ROC: its name, its curve points ({"fpr", "tpr", "threshold"}) and its AUC.
RocCurve = tuple[str, list[dict[str, float]], float]


class EvaluateInputError(UserInputError):
    """Raised when the evaluate stage's inputs do not fit together."""


@dataclass
class TestTile:
    """One scored test tile: its masks, and (for figure tiles only) its image and probability map.

    ``pseudo`` and ``cam_mask`` are ungated (refined and thresholded whatever the tile's label);
    :func:`compute_metrics` gates them by the classifier or by the label.
    """

    tile: Tile
    prediction: np.ndarray  # the segmenter's mask as the pipeline outputs it (after evaluate.segmenter_gate)
    pseudo: np.ndarray
    cam_mask: np.ndarray
    tissue: np.ndarray
    truth: np.ndarray | None
    classifier_probability: float
    head_probability: float
    prediction_ungated: np.ndarray | None = None  # the mask before the gate (None: no gate, the same)
    image: np.ndarray | None = None
    probability: np.ndarray | None = None


def figure_selection(tiles: Sequence[Tile], per_class: int, seed: int) -> list[Tile]:
    """Up to ``per_class`` positive then ``per_class`` negative tiles, chosen by a seeded draw over sorted names."""
    rng = np.random.default_rng(seed)
    chosen: list[Tile] = []
    for positive in (True, False):
        members = sorted((tile for tile in tiles if tile.positive == positive), key=lambda tile: tile.name)
        picks = sorted(rng.permutation(len(members))[:per_class].tolist())
        chosen.extend(members[index] for index in picks)
    return chosen


def joint_gate_probability(classifier_probability: float, head_probability: float) -> float:
    """The tile probability of the ``classifier_and_head`` gate: the lower of the two models' probabilities.

    A tile passes only where both the classifier and the segmenter's head find it positive enough, so a
    negative tile that one of them mistakes for a positive is still stopped by the other. That matters most
    where validation negatives are too few to place a cut (``decision_rule: auto`` then puts it at the lowest
    validation positive): every unseen negative above that cut passes a one-model gate. The two models
    learned the tile label from different targets (crops of the tile label; the pseudo-masks), so they are
    not fooled by the same tiles alone.
    """
    return min(float(classifier_probability), float(head_probability))


def gate_probability(tile_probabilities: Mapping[str, float], segmenter_gate: str) -> float:
    """The probability ``evaluate.segmenter_gate`` compares with its cut: the gating model's, or both models'.

    Args:
        tile_probabilities: the tile's ``classifier`` and ``head`` probabilities.
        segmenter_gate: ``classifier``, ``head`` or ``classifier_and_head``.
    """
    if segmenter_gate == CLASSIFIER_AND_HEAD:
        return joint_gate_probability(tile_probabilities["classifier"], tile_probabilities["head"])
    return float(tile_probabilities[segmenter_gate])


def choose_joint_gate_threshold(
    labels: Sequence[bool],
    classifier_probabilities: Sequence[float],
    head_probabilities: Sequence[float],
    rule: str,
) -> metrics.ThresholdChoice:
    """The ``classifier_and_head`` gate's cut, chosen on validation tiles by ``rule`` as each model's own is.

    Args:
        labels: the validation tiles' labels (positive = True).
        classifier_probabilities: the classifier's probability of each.
        head_probabilities: the segmenter head's probability of each.
        rule: ``auto`` or ``balanced_accuracy`` (:func:`weakseg.metrics.choose_decision_threshold`).
    """
    scores = [
        joint_gate_probability(classifier, head)
        for classifier, head in zip(classifier_probabilities, head_probabilities, strict=True)
    ]
    return metrics.choose_decision_threshold(labels, scores, rule)


def gate(masks: Sequence[np.ndarray], keep: Sequence[bool]) -> list[np.ndarray]:
    """Each mask where its tile is kept, an empty mask elsewhere."""
    return [mask if kept else np.zeros_like(mask) for mask, kept in zip(masks, keep, strict=True)]


def compute_metrics(
    scored: Sequence[TestTile],
    threshold: float,
    min_foreground_pixels: int,
    has_truth: bool,
    head_threshold: float | None = None,
    classifier_threshold: float | None = None,
    joint_threshold: float | None = None,
) -> dict[str, Any]:
    """Every number of ``metrics/evaluate.json`` from the scored tiles.

    ``threshold`` is the pixel threshold. ``classifier_threshold`` is the classifier's decision threshold
    (its checkpoint's; ``threshold`` if None): a tile the classifier calls negative gets empty CAM,
    pseudo-mask and baseline masks in the fair rows. ``head_threshold`` is the segmenter head's tile
    threshold (its checkpoint's; ``threshold`` if None). ``joint_threshold``, where the
    ``classifier_and_head`` gate is configured, is its cut on :func:`joint_gate_probability` (chosen on
    validation): it adds that decision's scores, the trivial baseline gated by it and the segmenter gated by it.
    """
    labels = [record.tile.positive for record in scored]
    classifier_cut = threshold if classifier_threshold is None else float(classifier_threshold)
    classified_positive = [record.classifier_probability >= classifier_cut for record in scored]
    areas = [float(np.count_nonzero(record.prediction)) for record in scored]
    predictions = [record.prediction for record in scored]
    pseudo_reference = gate([record.pseudo for record in scored], labels)
    # "Positive when the predicted foreground exceeds N pixels": area >= N + 1 on integer counts.
    area_threshold = float(min_foreground_pixels) + 1.0
    head_cut = threshold if head_threshold is None else float(head_threshold)
    result: dict[str, Any] = {
        # The classifier decides at the threshold train_classifier chose on validation (its checkpoint's).
        "classifier": {
            **metrics.classification_scores(labels, [r.classifier_probability for r in scored], classifier_cut),
            "threshold": classifier_cut,
        },
        "segmenter": {"vs_pseudo": metrics.segmentation_scores(predictions, pseudo_reference, labels)},
        "segmenter_tile": {
            # The head decides at the threshold train_segmenter chose on validation (its checkpoint's).
            "head": {
                **metrics.classification_scores(labels, [r.head_probability for r in scored], head_cut),
                "threshold": head_cut,
            },
            "area": metrics.classification_scores(labels, areas, area_threshold),
        },
        "tiles": {
            "test": len(scored),
            "positive": int(sum(labels)),
            "negative": int(len(labels) - sum(labels)),
            "classified_positive": int(sum(classified_positive)),
            "with_truth": len(scored) if has_truth else 0,
        },
        "settings": {"threshold": threshold, "min_foreground_pixels": min_foreground_pixels},
    }
    joint_positive: list[bool] | None = None
    if joint_threshold is not None:
        joint = [joint_gate_probability(r.classifier_probability, r.head_probability) for r in scored]
        joint_positive = [probability >= joint_threshold for probability in joint]
        result["classifier_and_head"] = {
            **metrics.classification_scores(labels, joint, float(joint_threshold)),
            "threshold": float(joint_threshold),
        }
    tissues = [record.tissue for record in scored]
    # Trivial reference points: the whole tissue of every tile called positive (by the classifier: what
    # the pipeline could output; by the label: what "lesion = tissue" scores with perfect tile labels).
    baseline = gate(tissues, classified_positive)
    result["baseline"] = {
        "tissue_if_classified_positive": {"vs_pseudo": metrics.segmentation_scores(baseline, pseudo_reference, labels)}
    }
    if has_truth:
        # has_truth: every scored tile carries its true mask.
        truths = cast(list[np.ndarray], [record.truth for record in scored])
        result["baseline"]["tissue_if_classified_positive"]["vs_truth"] = metrics.segmentation_scores(
            baseline, truths, labels
        )
        # The same with each tile's enclosed holes filled (evaluate.fill_holes' post-processing): how much of
        # a filled mask's score the lumens alone give.
        result["baseline"]["tissue_holes_filled_if_classified_positive"] = {
            "vs_truth": metrics.segmentation_scores(
                gate([fill_enclosed_holes(tissue) for tissue in tissues], classified_positive), truths, labels
            )
        }
        result["baseline"]["tissue_if_label_positive_oracle_label"] = {
            "vs_truth": metrics.segmentation_scores(gate(tissues, labels), truths, labels)
        }
        result["segmenter"]["vs_truth"] = metrics.segmentation_scores(predictions, truths, labels)
        # What each gate does, whichever is configured (ablations at no cost).
        ungated = [r.prediction if r.prediction_ungated is None else r.prediction_ungated for r in scored]
        head_positive = [record.head_probability >= head_cut for record in scored]
        result["segmenter_ungated"] = {"vs_truth": metrics.segmentation_scores(ungated, truths, labels)}
        result["segmenter_classifier_gated"] = {
            "vs_truth": metrics.segmentation_scores(gate(ungated, classified_positive), truths, labels)
        }
        result["segmenter_head_gated"] = {
            "vs_truth": metrics.segmentation_scores(gate(ungated, head_positive), truths, labels)
        }
        if joint_positive is not None:
            result["segmenter_classifier_and_head_gated"] = {
                "vs_truth": metrics.segmentation_scores(gate(ungated, joint_positive), truths, labels)
            }
            # The trivial answer with the same tile decisions as the gated segmenter.
            result["baseline"]["tissue_if_classifier_and_head_positive"] = {
                "vs_truth": metrics.segmentation_scores(gate(tissues, joint_positive), truths, labels)
            }
        cams = [record.cam_mask for record in scored]
        pseudos = [record.pseudo for record in scored]
        for key, masks, keep in (
            ("cam", cams, classified_positive),
            ("cam_oracle_label", cams, labels),
            ("pseudo", pseudos, classified_positive),
            ("pseudo_oracle_label", pseudos, labels),
        ):
            scores = metrics.segmentation_scores(gate(masks, keep), truths, labels)
            result[key] = {"vs_truth": {name: scores[name] for name in ("iou", "dice", "miou", "iou_positive_mean")}}
    return result


def tile_roc_curves(scored: Sequence[TestTile], result: dict[str, Any]) -> list[RocCurve]:
    """The ROC of the three tile-level decisions (classifier, segmenter head, segmenter area), in that order.

    ``result`` is :func:`compute_metrics`'s, whose AUCs label the curves.
    """
    labels = [record.tile.positive for record in scored]
    return [
        (
            "classifier",
            metrics.roc_curve_points(labels, [r.classifier_probability for r in scored]),
            result["classifier"]["auc"],
        ),
        (
            "segmenter head",
            metrics.roc_curve_points(labels, [r.head_probability for r in scored]),
            result["segmenter_tile"]["head"]["auc"],
        ),
        (
            "segmenter area",
            metrics.roc_curve_points(labels, [float(np.count_nonzero(r.prediction)) for r in scored]),
            result["segmenter_tile"]["area"]["auc"],
        ),
    ]


def write_roc_csv(path: str | Path, curve: RocCurve) -> None:
    """Writes one curve of :func:`tile_roc_curves` (the classifier's, for ``dvc plots``) as CSV, atomically."""
    write_csv(path, curve[1], ROC_COLUMNS)


def confusion_rows(
    scored: Sequence[TestTile], classifier_threshold: float, positive_label: str
) -> list[dict[str, str]]:
    """One ``{"actual", "predicted"}`` row per tile: its label and the classifier's decision, by class name.

    The negative class is named by the test tiles' negative label when there is one, else ``not <positive>``.
    """
    labels = [record.tile.positive for record in scored]
    negative_labels = sorted({record.tile.label for record in scored if not record.tile.positive})
    negative_name = negative_labels[0] if len(negative_labels) == 1 else f"not {positive_label}"
    return metrics.confusion_rows(
        labels,
        [record.classifier_probability >= classifier_threshold for record in scored],
        (negative_name, positive_label),
    )


def write_confusion_csv(
    path: str | Path, scored: Sequence[TestTile], classifier_threshold: float, positive_label: str
) -> None:
    """Writes :func:`confusion_rows` as CSV (for ``dvc plots``), atomically."""
    write_csv(path, confusion_rows(scored, classifier_threshold, positive_label), CONFUSION_COLUMNS)
