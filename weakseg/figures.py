"""Figures a person looks at: contact sheets, overlays, error maps, uncertainty maps and ROC curves.

Arrays in, arrays out (uint8 RGB); :func:`save_figure` writes a titled grid and :func:`save_roc_figure`
ROC curves with matplotlib.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from weakseg.io import atomic_path

# Error map colours: true positive white, false positive red, false negative blue, true negative black.
ERROR_COLOURS = {
    "true_positive": (255, 255, 255),
    "false_positive": (255, 0, 0),
    "false_negative": (0, 0, 255),
    "true_negative": (0, 0, 0),
}


def _to_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        image = np.clip(np.asarray(image, dtype=np.float64) * 255.0, 0, 255).round().astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return image


def heatmap(values: np.ndarray) -> np.ndarray:
    """A 0..1 map (CAM, probability) as a uint8 RGB image with matplotlib's ``jet`` colour map."""
    from matplotlib import colormaps

    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    return (colormaps["jet"](values)[..., :3] * 255).round().astype(np.uint8)


def overlay_mask(
    image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0), alpha: float = 0.4
) -> np.ndarray:
    """Tints the foreground of ``mask`` on an RGB tile and draws its outline."""
    from skimage.segmentation import find_boundaries

    image = _to_rgb(image).astype(np.float64)
    mask = np.asarray(mask) > 0
    tinted = image.copy()
    tinted[mask] = (1 - alpha) * image[mask] + alpha * np.asarray(colour, dtype=np.float64)
    tinted[find_boundaries(mask, mode="inner")] = colour
    return tinted.round().astype(np.uint8)


def overlay_heatmap(image: np.ndarray, values: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blends a 0..1 heatmap over an RGB tile."""
    blended = (1 - alpha) * _to_rgb(image).astype(np.float64) + alpha * heatmap(values).astype(np.float64)
    return blended.round().astype(np.uint8)


def error_map(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Colours each pixel by its outcome (see ``ERROR_COLOURS``)."""
    prediction = np.asarray(prediction) > 0
    truth = np.asarray(truth) > 0
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
    result = np.zeros(prediction.shape + (3,), dtype=np.uint8)
    result[prediction & truth] = ERROR_COLOURS["true_positive"]
    result[prediction & ~truth] = ERROR_COLOURS["false_positive"]
    result[~prediction & truth] = ERROR_COLOURS["false_negative"]
    return result


def uncertainty(probability: np.ndarray) -> np.ndarray:
    """U = 1 - 2|p - 0.5|: 1 where the model is undecided (p = 0.5), 0 where it is sure."""
    probability = np.clip(np.asarray(probability, dtype=np.float64), 0.0, 1.0)
    return 1.0 - 2.0 * np.abs(probability - 0.5)


def save_figure(
    path: str | Path,
    rows: Sequence[Sequence[np.ndarray]],
    column_titles: Sequence[str] | None = None,
    row_titles: Sequence[str] | None = None,
    title: str | None = None,
    cell_inches: float = 1.8,
) -> None:
    """Writes a grid of images (each uint8 RGB/gray, bool, or float in 0..1) as one PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows or not rows[0]:
        raise ValueError(f"{path}: a figure needs at least one image")
    height, width = len(rows), max(len(row) for row in rows)
    figure, axes = plt.subplots(
        height, width, figsize=(cell_inches * width, cell_inches * height + (0.4 if title else 0)), squeeze=False
    )
    for row_index in range(height):
        for column_index in range(width):
            axis = axes[row_index][column_index]
            axis.set_xticks([])
            axis.set_yticks([])
            if column_index < len(rows[row_index]):
                axis.imshow(_to_rgb(rows[row_index][column_index]), interpolation="nearest")
            else:
                axis.axis("off")
            if row_index == 0 and column_titles and column_index < len(column_titles):
                axis.set_title(column_titles[column_index], fontsize=8)
            if column_index == 0 and row_titles and row_index < len(row_titles):
                axis.set_ylabel(row_titles[row_index], fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        # Fixed metadata so that equal figures give equal bytes.
        figure.savefig(temporary, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)


def save_roc_figure(path: str | Path, curves: Sequence[tuple[str, Sequence[Mapping[str, float]], float]]) -> None:
    """Writes ROC curves ``(name, points {"fpr", "tpr"}, AUC)``, with their AUCs, in one readable plot, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    for name, points, auc in curves:
        axis.plot([p["fpr"] for p in points], [p["tpr"] for p in points], label=f"{name} (AUC {auc:.3f})")
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    axis.set_xlabel("false positive rate (1 - specificity)")
    axis.set_ylabel("true positive rate (sensitivity)")
    axis.set_xlim(-0.01, 1.01)
    axis.set_ylim(-0.01, 1.01)
    axis.set_title("ROC on the test partition", fontsize=10)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)
