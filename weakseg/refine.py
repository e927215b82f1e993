"""From a class activation map to a pseudo-mask: the paper's refinement chain, one function per step.

The chain (Spajic et al. 2025) is: threshold the CAM at a quantile of its values inside the tissue,
morphological opening then closing, removal of small connected components, and a fully connected CRF
(DenseCRF) on the stain-normalized RGB tile. Negative tiles get empty masks. Every function takes and
returns arrays; files are read and written by ``weakseg/pseudo_masks.py`` (for ``stages/refine_masks.py``).

With ``background_quantile`` set, a positive tile's pseudo-mask has three labels instead of two: the
foreground (the chain's mask), a confident background (outside the region, plus region pixels whose CAM is
at or below the ``background_quantile`` of the region's CAM values) and, in between, an IGNORE band that the
segmenter's loss skips (:func:`ignore_band`), so the segmenter decides those pixels by generalising from the
negative tiles rather than from a fixed foreground share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import morphology

from weakseg.errors import UserInputError

UNARY_KINDS = ("probability", "hard")

# The CRF never sees a probability of exactly 0 or 1: log(0) would make a label impossible to change.
_PROBABILITY_CLIP = 1e-4


class RefineInputError(UserInputError):
    """Raised when a CAM, tissue mask or image does not fit the refinement chain."""


@dataclass(frozen=True)
class CrfSettings:
    """DenseCRF settings (the ``refine.crf`` params block, as plain values).

    Attributes:
        iterations: mean-field iterations.
        unary: ``probability`` (from the CAM, steered by the refined mask) or ``hard`` (the refined mask only).
        hard_confidence: the foreground probability given to mask pixels by the hard unary (and to the
            mask term of the probability unary).
        gaussian_sxy: spatial scale of the smoothness term, in pixels.
        gaussian_compat: weight of the smoothness term.
        bilateral_sxy: spatial scale of the appearance term, in pixels.
        bilateral_srgb: colour scale of the appearance term, in 8-bit RGB units.
        bilateral_compat: weight of the appearance term.
    """

    iterations: int = 5
    unary: str = "probability"
    hard_confidence: float = 0.9
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0


@dataclass(frozen=True)
class RefineSettings:
    """The whole chain's settings (the ``refine`` params block, as plain values that pickle cheaply).

    Attributes:
        threshold_quantile: the CAM quantile (within tissue) above which a pixel is foreground.
        restrict_to_tissue: take the quantile over tissue pixels only and keep the mask inside the tissue.
        opening_kernel: side of the square opening footprint; 0 skips opening.
        closing_kernel: side of the square closing footprint; 0 skips closing.
        min_object_size: connected components with fewer pixels are removed; 0 keeps all.
        crf: DenseCRF settings, or None to skip the CRF.
        background_quantile: None for a two-label mask (everything not foreground is background); else a
            quantile in ``[0, threshold_quantile]``: region pixels whose CAM is at or below it are background,
            and the other non-foreground region pixels are ignored (:func:`ignore_band`).
    """

    threshold_quantile: float = 0.5
    restrict_to_tissue: bool = True
    opening_kernel: int = 3
    closing_kernel: int = 5
    min_object_size: int = 64
    crf: CrfSettings | None = CrfSettings()
    background_quantile: float | None = None


@dataclass(frozen=True)
class RefinementSteps:
    """The mask after each step of the chain, so the value of each step can be measured.

    Attributes:
        thresholded: the quantile-thresholded CAM.
        morphology: after opening, closing and small-object removal.
        refined: after the CRF (equal to ``morphology`` when the CRF is off); the pseudo-mask's foreground.
        ignore: the pixels the segmenter's loss skips (never foreground); all False without
            ``background_quantile`` and on negative tiles.
    """

    thresholded: np.ndarray
    morphology: np.ndarray
    refined: np.ndarray
    ignore: np.ndarray


def _as_float_cam(cam: np.ndarray) -> np.ndarray:
    cam = np.asarray(cam)
    if cam.ndim != 2:
        raise RefineInputError(f"a CAM must be a 2-D array, got shape {cam.shape}")
    if cam.dtype == np.uint8:
        return cam.astype(np.float64) / 255.0
    return cam.astype(np.float64)


def _check_same_shape(cam: np.ndarray, other: np.ndarray, what: str) -> None:
    if other.shape[:2] != cam.shape:
        raise RefineInputError(f"{what} shape {other.shape[:2]} differs from the CAM's shape {cam.shape}")


def threshold_cam(
    cam: np.ndarray, tissue: np.ndarray | None, quantile: float = 0.5, restrict_to_tissue: bool = True
) -> np.ndarray:
    """Foreground where the CAM lies above its ``quantile`` (taken over tissue pixels).

    The cut and its tie rule are :func:`quantile_cut`'s (a flat CAM gives an empty mask at the median).

    Args:
        cam: ``(H, W)`` activation map, float (any scale) or uint8.
        tissue: ``(H, W)`` tissue mask (bool or 0/255), or None for "everything is tissue".
        quantile: in [0, 1]; 0.5 keeps the upper half of the tissue's CAM values.
        restrict_to_tissue: take the quantile over tissue pixels only, and never mark non-tissue pixels.

    Returns:
        A boolean ``(H, W)`` mask; empty when the tissue is empty.

    Raises:
        RefineInputError: if the shapes differ or the quantile is outside [0, 1].
    """
    values = _as_float_cam(cam)
    if not 0.0 <= quantile <= 1.0:
        raise RefineInputError(f"refine.threshold_quantile must be in [0, 1], got {quantile}")
    if tissue is None or not restrict_to_tissue:
        region = np.ones(values.shape, dtype=bool)
    else:
        region = np.asarray(tissue) > 0
        _check_same_shape(values, region, "tissue mask")
    if not region.any():
        return np.zeros(values.shape, dtype=bool)
    return (values > quantile_cut(values[region], quantile)) & region


def quantile_cut(inside: np.ndarray, quantile: float) -> float:
    """The CAM value above which a pixel is foreground (``cam > cut``), from the values inside the region.

    The cut is the ``quantile`` of ``inside``, strict, unless pixels tied at it must be kept to come nearer
    the wanted share ``1 - quantile`` of the region (an 8-bit CAM saturated over most of the tissue): then
    the cut moves down to the largest value below the tie. On a tie of distances the strict side wins, so a
    flat CAM (a classifier that saw nothing) gives an empty mask at the median. The thresholded mask and the
    CRF's unary both take their cut from here.

    Args:
        inside: the CAM values of the region (any shape, float).
        quantile: in [0, 1].
    """
    inside = np.asarray(inside, dtype=np.float64).ravel()
    cut = float(np.quantile(inside, quantile))
    wanted = 1.0 - quantile
    strict_share = float(np.count_nonzero(inside > cut)) / inside.size
    inclusive_share = float(np.count_nonzero(inside >= cut)) / inside.size
    if abs(inclusive_share - wanted) < abs(strict_share - wanted):
        below = inside[inside < cut]
        return float(below.max()) if below.size else float(np.nextafter(inside.min(), -np.inf))
    return cut


def _square(size: int) -> np.ndarray:
    return morphology.footprint_rectangle((size, size))


def _square_morphology(mask: np.ndarray, kernel: int, operation: Callable[..., np.ndarray]) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if kernel <= 1:
        return mask.copy()
    return operation(mask, _square(kernel))


def open_mask(mask: np.ndarray, kernel: int = 3) -> np.ndarray:
    """Morphological opening with a ``kernel`` x ``kernel`` square: removes specks and thin bridges.

    A kernel of 0 or 1 returns the mask unchanged.
    """
    return _square_morphology(mask, kernel, morphology.opening)


def close_mask(mask: np.ndarray, kernel: int = 5) -> np.ndarray:
    """Morphological closing with a ``kernel`` x ``kernel`` square: fills small gaps and holes.

    A kernel of 0 or 1 returns the mask unchanged.
    """
    return _square_morphology(mask, kernel, morphology.closing)


def remove_small_components(mask: np.ndarray, min_size: int = 64) -> np.ndarray:
    """Removes 8-connected foreground components of fewer than ``min_size`` pixels (0 keeps all)."""
    mask = np.asarray(mask, dtype=bool)
    if min_size <= 1:
        return mask.copy()
    # skimage >= 0.26 removes components of size <= max_size.
    return morphology.remove_small_objects(mask, max_size=min_size - 1, connectivity=2)


def fill_enclosed_holes(mask: np.ndarray) -> np.ndarray:
    """Adds to the mask every region it encloses: background not 4-connected to the image's edge.

    Pathologists outline a lesion as a region, so the lumen of a gland inside it is lesion in their masks
    although it is glass, not tissue; a mask restricted to tissue leaves those lumens out. Tissue the mask
    encloses is filled too. Holes open to the edge of the image stay (they may lie outside the lesion).
    """
    return ndimage.binary_fill_holes(np.asarray(mask, dtype=bool))


def mask_from_probability(
    probability: np.ndarray, threshold: float, tissue: np.ndarray | None = None, fill_holes: bool = False
) -> np.ndarray:
    """The segmenter's mask of one tile, as ``evaluate`` scores it and ``predict`` writes it.

    Args:
        probability: ``(H, W)`` foreground probabilities.
        threshold: pixels at or above it are foreground.
        tissue: ``(H, W)`` boolean tissue mask to restrict the mask to (lesion pixels are tissue), or None.
        fill_holes: then add the regions the mask encloses (:func:`fill_enclosed_holes`).
    """
    mask = np.asarray(probability) >= threshold
    if tissue is not None:
        mask &= tissue
    return fill_enclosed_holes(mask) if fill_holes else mask


def cam_foreground_probability(cam: np.ndarray, cut: float) -> np.ndarray:
    """Maps CAM values to a foreground probability with the threshold at 0.5.

    Piecewise linear and monotone: ``0 -> 0``, ``cut -> 0.5``, ``max(cam) -> 1``, so the CRF's decision
    boundary without pairwise terms is the quantile threshold itself.
    """
    values = _as_float_cam(cam)
    top = float(values.max()) if values.size else 1.0
    below = 0.5 * values / cut if cut > 0 else np.zeros_like(values)
    span = top - cut
    above = 0.5 + 0.5 * (values - cut) / span if span > 0 else np.full_like(values, 1.0)
    return np.clip(np.where(values <= cut, below, above), 0.0, 1.0)


def crf_unary_probability(
    mask: np.ndarray,
    cam: np.ndarray | None,
    cut: float,
    tissue: np.ndarray | None,
    settings: CrfSettings,
) -> np.ndarray:
    """The foreground probability the CRF starts from.

    ``hard``: ``hard_confidence`` on the mask and ``1 - hard_confidence`` elsewhere. ``probability``: the
    mean of the hard term and the CAM probability (:func:`cam_foreground_probability`), so the CRF sees how
    sure the classifier was while the morphology steps still count. Outside the tissue the probability is
    capped at the background level: glass and lumen are never the lesion.

    Returns:
        ``(H, W)`` float64 probabilities in ``[1e-4, 1 - 1e-4]``.
    """
    if settings.unary not in UNARY_KINDS:
        raise RefineInputError(f"refine.crf.unary must be one of {UNARY_KINDS}, got {settings.unary!r}")
    mask = np.asarray(mask, dtype=bool)
    confidence = settings.hard_confidence
    hard = np.where(mask, confidence, 1.0 - confidence)
    if settings.unary == "probability":
        if cam is None:
            raise RefineInputError("refine.crf.unary 'probability' needs the CAM")
        probability = 0.5 * (hard + cam_foreground_probability(cam, cut))
    else:
        probability = hard
    if tissue is not None:
        probability = np.where(np.asarray(tissue) > 0, probability, np.minimum(probability, 1.0 - confidence))
    return np.clip(probability, _PROBABILITY_CLIP, 1.0 - _PROBABILITY_CLIP)


def dense_crf(image: np.ndarray, foreground_probability: np.ndarray, settings: CrfSettings) -> np.ndarray:
    """Two-label DenseCRF (pydensecrf) with a Gaussian and a bilateral pairwise term.

    Args:
        image: ``(H, W, 3)`` uint8 RGB tile (the stain-normalized one).
        foreground_probability: ``(H, W)`` probabilities in (0, 1).
        settings: iterations and pairwise parameters.

    Returns:
        A boolean ``(H, W)`` mask: pixels whose foreground marginal wins after inference.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise RefineInputError(f"the CRF needs a uint8 RGB tile, got shape {image.shape} dtype {image.dtype}")
    height, width = foreground_probability.shape
    if image.shape[:2] != (height, width):
        raise RefineInputError(f"image shape {image.shape[:2]} differs from the CAM's shape {(height, width)}")
    probability = np.asarray(foreground_probability, dtype=np.float32)
    softmax = np.stack([1.0 - probability, probability])
    crf = dcrf.DenseCRF2D(width, height, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(softmax)))
    crf.addPairwiseGaussian(sxy=settings.gaussian_sxy, compat=settings.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=settings.bilateral_sxy,
        srgb=settings.bilateral_srgb,
        # pydensecrf's memoryview needs a writable buffer (PIL arrays are read-only).
        rgbim=np.require(image, requirements=["C", "W"]),
        compat=settings.bilateral_compat,
    )
    marginals = np.asarray(crf.inference(settings.iterations)).reshape(2, height, width)
    # Ties go to background, so a CRF that is undecided never invents lesion.
    return marginals[1] > marginals[0]


def refine_pseudo_mask(
    cam: np.ndarray,
    image: np.ndarray,
    tissue: np.ndarray | None,
    positive: bool,
    settings: RefineSettings,
) -> RefinementSteps:
    """Runs the whole chain on one tile and keeps every intermediate mask.

    Args:
        cam: ``(H, W)`` CAM (uint8 0..255 or float 0..1).
        image: ``(H, W, 3)`` uint8 stain-normalized RGB tile (used by the CRF only).
        tissue: ``(H, W)`` tissue mask, or None.
        positive: the tile's image-level label; negative tiles get empty masks at every step.
        settings: the chain's parameters.

    Returns:
        The thresholded, morphology and refined masks and the ignore band (boolean, ``(H, W)``).

    Raises:
        RefineInputError: if the shapes differ or ``background_quantile`` is outside ``[0, threshold_quantile]``.
    """
    values = _as_float_cam(cam)
    _check_background_quantile(settings.background_quantile, settings.threshold_quantile)
    if tissue is not None:
        _check_same_shape(values, np.asarray(tissue), "tissue mask")
    empty = np.zeros(values.shape, dtype=bool)
    if not positive:
        return RefinementSteps(empty, empty.copy(), empty.copy(), empty.copy())
    thresholded = threshold_cam(values, tissue, settings.threshold_quantile, settings.restrict_to_tissue)
    cleaned = open_mask(thresholded, settings.opening_kernel)
    cleaned = close_mask(cleaned, settings.closing_kernel)
    cleaned = remove_small_components(cleaned, settings.min_object_size)
    tissue_region = None if tissue is None or not settings.restrict_to_tissue else np.asarray(tissue) > 0
    if settings.crf is None:
        refined = cleaned.copy()
    else:
        region = tissue_region if tissue_region is not None else np.ones(values.shape, dtype=bool)
        cut = quantile_cut(values[region], settings.threshold_quantile) if region.any() else 1.0
        probability = crf_unary_probability(cleaned, values, cut, tissue_region, settings.crf)
        refined = dense_crf(image, probability, settings.crf)
    if tissue_region is not None:
        # Closing and the CRF can reach past the tissue edge; lesion pixels are tissue by definition.
        refined &= tissue_region
    if settings.background_quantile is None:
        ignore = np.zeros(values.shape, dtype=bool)
    else:
        ignore = ignore_band(values, tissue_region, refined, settings.background_quantile)
    return RefinementSteps(thresholded, cleaned, refined, ignore)


def _check_background_quantile(background_quantile: float | None, threshold_quantile: float) -> None:
    if background_quantile is not None and not 0.0 <= background_quantile <= threshold_quantile:
        raise RefineInputError(
            f"refine.background_quantile must be in [0, refine.threshold_quantile] = [0, {threshold_quantile}], "
            f"got {background_quantile}"
        )


def ignore_band(
    cam: np.ndarray, region: np.ndarray | None, foreground: np.ndarray, background_quantile: float
) -> np.ndarray:
    """The pixels that are neither foreground nor confident background: what the segmenter's loss ignores.

    Background is every pixel outside ``region`` plus the region pixels whose CAM is at or below the
    ``background_quantile`` of the region's CAM values (``cam <= quantile_cut(...)``, the chain's one cut, so
    ``0`` calls no region pixel background). The foreground wins where the two meet (closing or the CRF can
    reach low CAM values). With ``region`` None the whole tile is the region.

    Args:
        cam: ``(H, W)`` CAM (uint8 0..255 or float).
        region: ``(H, W)`` tissue mask the chain took its quantiles over, or None for the whole tile.
        foreground: ``(H, W)`` boolean pseudo-mask foreground.
        background_quantile: in [0, 1].

    Returns:
        A boolean ``(H, W)`` mask, disjoint from ``foreground`` and from the background.

    Raises:
        RefineInputError: if the shapes differ or the quantile is outside [0, 1].
    """
    values = _as_float_cam(cam)
    if not 0.0 <= background_quantile <= 1.0:
        raise RefineInputError(f"refine.background_quantile must be in [0, 1], got {background_quantile}")
    inside = np.ones(values.shape, dtype=bool) if region is None else np.asarray(region) > 0
    _check_same_shape(values, inside, "tissue mask")
    foreground = np.asarray(foreground, dtype=bool)
    _check_same_shape(values, foreground, "foreground mask")
    if not inside.any():
        return np.zeros(values.shape, dtype=bool)
    confident_background = values <= quantile_cut(values[inside], background_quantile)
    return inside & ~confident_background & ~foreground


def foreground_fraction(mask: np.ndarray, within: np.ndarray | None = None) -> float:
    """The share of foreground pixels, over the tile or over ``within`` (0.0 when ``within`` is empty)."""
    mask = np.asarray(mask, dtype=bool)
    if within is None:
        return float(mask.mean()) if mask.size else 0.0
    region = np.asarray(within) > 0
    total = int(region.sum())
    return float(np.count_nonzero(mask & region)) / total if total else 0.0
