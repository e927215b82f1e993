"""Optical density, tissue masks and per-tile colour measurements of H&E tiles (arrays in, arrays out).

Tissue masks: a pixel is tissue where the Euclidean norm of its optical density (with ``Io``, negative
channels clipped to 0) exceeds a threshold, and where its colour is a stain's. The threshold is Otsu's on
the tile's optical-density norms, clipped to ``[threshold_min, threshold_max]``: Otsu adapts to dim glass,
and the clip stops it from splitting a tile that holds no background into nuclei versus stroma. The colour
test keeps pixels whose green optical density exceeds their blue by ``min_green_excess`` times their
optical-density norm: hematoxylin and eosin both absorb green far more than blue, while grey or
yellow-tinted glass (a sixth of the EBHI tiles show it, with optical densities as high as pale stroma)
absorbs blue as much or more. Objects and holes smaller than the given sizes are then removed
(scikit-image).

Colour measurements (:func:`mean_optical_density`, :func:`colour_features`, :func:`colour_separability_auc`)
describe what stain normalization changes; the ``normalize`` stage reports them.
"""

from __future__ import annotations

import numpy as np
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

DEFAULT_BACKGROUND_INTENSITY = 240
DEFAULT_THRESHOLD_MIN = 0.15
DEFAULT_THRESHOLD_MAX = 0.3
DEFAULT_MIN_GREEN_EXCESS = 0.1


# ------------------------------------------------------------------------------------ optical density
def optical_density_table(background_intensity: float) -> np.ndarray:
    """Optical density of each grey level 0..255: ``-log((I + 1) / Io)``, float64 ``(256,)``."""
    # I + 1 as torchstain does, so that black pixels have a finite optical density.
    return -np.log((np.arange(256, dtype=np.float64) + 1.0) / float(background_intensity))


def optical_density(image: np.ndarray, background_intensity: float = DEFAULT_BACKGROUND_INTENSITY) -> np.ndarray:
    """Beer-Lambert optical density ``-log((I + 1) / Io)`` of a uint8 RGB image, float64 ``(H, W, 3)``."""
    image = check_rgb(image)
    return optical_density_table(background_intensity)[image]


def check_rgb(image: np.ndarray) -> np.ndarray:
    """The image as an array, if it is uint8 RGB ``(H, W, 3)``; ValueError otherwise."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    return image


# --------------------------------------------------------------------------------------- tissue mask
def tissue_mask(
    image: np.ndarray,
    min_object_size: int,
    min_hole_size: int,
    background_intensity: float = DEFAULT_BACKGROUND_INTENSITY,
    threshold_min: float = DEFAULT_THRESHOLD_MIN,
    threshold_max: float = DEFAULT_THRESHOLD_MAX,
    min_green_excess: float | None = DEFAULT_MIN_GREEN_EXCESS,
) -> np.ndarray:
    """Tissue (True) versus background: white or tinted glass and lumen.

    Otsu's threshold on the optical-density norm, clipped to ``[threshold_min, threshold_max]``, and a
    stain-colour test (green absorbed more than blue), then objects smaller than ``min_object_size``
    pixels removed and holes smaller than ``min_hole_size`` filled.

    Args:
        image: uint8 RGB ``(H, W, 3)``.
        min_object_size: tissue components with fewer pixels are dropped (0 keeps all).
        min_hole_size: background components inside tissue with fewer pixels are filled (0 fills none).
        background_intensity: ``Io`` of the optical density.
        threshold_min: lowest optical-density norm threshold.
        threshold_max: highest optical-density norm threshold.
        min_green_excess: tissue needs ``OD_green - OD_blue > min_green_excess * |OD|``; None skips the test.

    Returns:
        A bool ``(H, W)`` mask.
    """
    if not 0.0 <= threshold_min <= threshold_max:
        raise ValueError(f"need 0 <= threshold_min ({threshold_min}) <= threshold_max ({threshold_max})")
    density = np.maximum(optical_density_table(background_intensity), 0.0)[check_rgb(image)]
    norm = np.sqrt(np.einsum("hwc,hwc->hw", density, density))
    if float(norm.max()) > float(norm.min()):
        threshold = float(threshold_otsu(norm))
    else:  # one value: Otsu is undefined, and the bounds decide
        threshold = threshold_min
    threshold = min(max(threshold, threshold_min), threshold_max)
    mask = norm > threshold
    if min_green_excess is not None:
        mask &= density[..., 1] - density[..., 2] > min_green_excess * norm
    if min_object_size > 1:
        mask = remove_small_objects(mask, max_size=min_object_size - 1)
    if min_hole_size > 1:
        mask = remove_small_holes(mask, max_size=min_hole_size - 1)
    return mask


# ------------------------------------------------------------------------------------- measurements
def _channel_histograms(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``(3, 256)`` pixel counts per channel, of the pixels under ``mask`` (all where None)."""
    flat = check_rgb(image).reshape(-1, 3)
    if mask is not None:
        flat = flat[np.asarray(mask, dtype=bool).reshape(-1)]
    return np.stack([np.bincount(flat[:, channel], minlength=256) for channel in range(3)])


def mean_optical_density(
    image: np.ndarray, mask: np.ndarray | None = None, background_intensity: float = DEFAULT_BACKGROUND_INTENSITY
) -> np.ndarray:
    """Mean optical density ``(3,)`` of a tile's pixels under ``mask`` (every pixel where the mask is empty)."""
    if mask is not None and not np.any(mask):
        mask = None
    # Through 256-bin histograms: one optical density per grey level instead of one per pixel.
    counts = _channel_histograms(image, mask)
    return counts @ optical_density_table(background_intensity) / counts.sum(axis=1)


def colour_features(
    image: np.ndarray, bins: int = 8, background_intensity: float = DEFAULT_BACKGROUND_INTENSITY
) -> np.ndarray:
    """Per-tile colour description: an RGB histogram (``bins`` per channel, fractions) plus mean optical density.

    The features of the shared data's README, which found that they alone separate its classes.
    """
    if 256 % bins:
        raise ValueError(f"bins must divide 256, got {bins}")
    counts = _channel_histograms(image)
    fractions = counts.reshape(3, bins, 256 // bins).sum(axis=2) / counts.sum(axis=1, keepdims=True)
    density = counts @ optical_density_table(background_intensity) / counts.sum(axis=1)
    return np.concatenate([fractions.reshape(-1), density]).astype(np.float64)


def colour_separability_auc(features: np.ndarray, labels: np.ndarray, seed: int, folds: int = 5) -> float | None:
    """Cross-validated ROC AUC of a logistic regression predicting the label from colour features alone.

    Only the tiles given are used (pass the train partition: this must not see test labels).

    Returns:
        The pooled out-of-fold AUC, or None where a class has fewer than ``folds`` tiles.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels, dtype=bool)
    if min(int(labels.sum()), int((~labels).sum())) < folds:
        return None
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, features, labels, cv=splitter, method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, scores))
