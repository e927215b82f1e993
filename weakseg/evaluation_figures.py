"""The ``evaluate`` stage's figures: overlays, error maps and uncertainty maps of the figure tiles, and ROC.

What the figures show is what :mod:`weakseg.evaluation` scores: pseudo-masks gated by the label (the
segmenter's reference), CAM and pseudo-mask errors gated by the classifier's decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from weakseg import figures
from weakseg.evaluation import EvaluateInputError, RocCurve, TestTile, gate

ERROR_LEGEND = "white: true positive, red: false positive, blue: false negative, black: true negative"


def row_title(record: TestTile) -> str:
    """A figure row's title: the tile's name, its label and both models' tile probabilities."""
    label = record.tile.label
    return (
        f"{record.tile.stem[:22]}\n{label} | clf p={record.classifier_probability:.2f}\n"
        f"seg head p={record.head_probability:.2f}"
    )


def write_evaluation_figures(
    folder: Path,
    shown: Sequence[TestTile],
    has_truth: bool,
    threshold: float,
    classifier_threshold: float,
    roc_curves: Sequence[RocCurve],
) -> None:
    """Writes ``overlays.png``, ``error_maps.png``, ``uncertainty.png`` and ``roc_curves.png`` into ``folder``.

    Args:
        folder: the output folder.
        shown: the figure tiles, scored with their image and probability map.
        has_truth: whether true masks exist (then errors are against them, and CAM and pseudo-mask errors
            are shown too).
        threshold: the pixel threshold of the segmenter's prediction.
        classifier_threshold: the classifier's decision threshold (gates the CAM and pseudo-mask errors).
        roc_curves: the tile-level ROC curves (:func:`weakseg.evaluation.tile_roc_curves`).

    Raises:
        EvaluateInputError: if a figure tile was scored without its image and probability map.
    """
    row_titles = [row_title(record) for record in shown]
    overlay_rows: list[list[np.ndarray]] = []
    error_rows: list[list[np.ndarray]] = []
    uncertainty_rows: list[list[np.ndarray]] = []
    for record in shown:
        if record.image is None or record.probability is None:
            raise EvaluateInputError(
                f"{record.tile.name}: a figure tile was scored without its image and probability map"
            )
        image, probability = record.image, record.probability
        decided = record.classifier_probability >= classifier_threshold
        pseudo_reference, cam_mask, pseudo = gate(
            [record.pseudo, record.cam_mask, record.pseudo], [record.tile.positive, decided, decided]
        )
        row = [image, pseudo_reference]
        if record.truth is not None:
            row.append(record.truth)
        row += [
            record.prediction,
            figures.heatmap(probability),
            figures.overlay_mask(image, record.prediction),
            figures.overlay_heatmap(image, probability),
        ]
        overlay_rows.append(row)
        reference = record.truth if record.truth is not None else pseudo_reference
        errors = [image, reference, record.prediction, figures.error_map(record.prediction, reference)]
        if has_truth:
            errors += [figures.error_map(cam_mask, reference), figures.error_map(pseudo, reference)]
        error_rows.append(errors)
        certainty = figures.uncertainty(probability)
        uncertainty_rows.append(
            [image, figures.heatmap(probability), figures.heatmap(certainty), figures.overlay_heatmap(image, certainty)]
        )
    overlay_columns = (
        ["tile", "pseudo-mask"]
        + (["true mask"] if has_truth else [])
        + [
            f"prediction (p>={threshold:g})",
            "probability (blue 0, red 1)",
            "prediction on tile",
            "probability on tile",
        ]
    )
    figures.save_figure(
        folder / "overlays.png",
        overlay_rows,
        column_titles=overlay_columns,
        row_titles=row_titles,
        title="Segmenter on test tiles (positive tiles first)",
    )
    against = "true masks" if has_truth else "pseudo-masks"
    error_columns = ["tile", against, "segmenter", "segmenter errors"] + (
        ["thresholded CAM errors\n(classifier-gated)", "pseudo-mask errors\n(classifier-gated)"] if has_truth else []
    )
    figures.save_figure(
        folder / "error_maps.png",
        error_rows,
        column_titles=error_columns,
        row_titles=row_titles,
        title=f"Error maps against {against}\n{ERROR_LEGEND}",
    )
    figures.save_figure(
        folder / "uncertainty.png",
        uncertainty_rows,
        column_titles=["tile", "probability", "uncertainty 1-2|p-0.5|", "uncertainty on tile"],
        row_titles=row_titles,
        title="Segmenter uncertainty (blue: sure, red: undecided)",
    )
    figures.save_roc_figure(folder / "roc_curves.png", roc_curves)
