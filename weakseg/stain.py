"""Macenko stain normalization and tissue masks (arrays in, arrays out).

Macenko et al., "A method for normalizing histology slides for quantitative analysis", ISBI 2009.

Implementation: our own vectorized NumPy version of torchstain's ``NumpyMacenkoNormalizer`` (torchstain
1.4), written for speed and for robustness on degenerate tiles. It follows torchstain step by step (optical
density with ``Io``, pixels with any channel below ``beta`` dropped, the plane of the two leading
eigenvectors of the optical-density covariance, stain angles at the ``alpha`` and ``100 - alpha``
percentiles, hematoxylin first by its red optical density, concentrations by least squares, the 99th
percentile as maximum concentration) and differs only where torchstain is slow or fragile:

- optical density from a 256-entry lookup table instead of a logarithm per pixel;
- concentrations by the pseudo-inverse of the 3x2 stain matrix (the same least-squares solution as
  ``np.linalg.lstsq`` for a full-rank matrix) in float32;
- the leading eigenvector's sign is fixed so that optical densities project positively (``eigh`` may
  return either sign; with the negative one torchstain's angles wrap around +-pi);
- output is rounded rather than truncated to uint8;
- degenerate tiles (too little tissue, one colour, saturated, coincident stain vectors) are detected and
  passed through instead of producing NaNs or raising.

``tests/test_stain.py`` checks that it agrees with torchstain: on realistic tiles the fitted stain
matrix within 1e-3 (absolute), maximum concentrations within 0.5 % and normalized pixels within 1 grey
level on average and 3 levels at the 99.9th percentile (rounding versus truncation and float32).
``benchmarks/bench_normalize.py`` measures the speed ratio.

Fitting to a training partition: :func:`fit_stain_reference` fits every given tile on its own and takes
the element-wise median of the unit stain vectors (renormalized), which one oddly stained tile cannot
drag; the maximum concentrations are the median over tiles of each tile's 99th percentile concentration
under that median matrix. With a single tile this is exactly torchstain's ``fit``.

Optical density, tissue masks and colour measurements are in :mod:`weakseg.tissue`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from weakseg.errors import UserInputError
from weakseg.io import write_json
from weakseg.tissue import DEFAULT_BACKGROUND_INTENSITY, check_rgb, optical_density_table

DEFAULT_ALPHA = 1.0
DEFAULT_BETA = 0.15
DEFAULT_MIN_TISSUE_FRACTION = 0.05
MAX_CONCENTRATION_PERCENTILE = 99.0

# Below this many optical-density pixels the covariance and percentiles are noise, whatever the fraction.
_MIN_TISSUE_PIXELS = 16
# Spread across the second stain direction (standard deviation of optical density) below this fraction of
# the mean optical density means one colour plus sensor noise: 660 real EBHI tiles range 0.038-0.28, a
# flat colour with +-2 grey levels of noise about 0.009.
_MIN_SECOND_SPREAD = 0.02
# Stain vectors closer than this (degrees) cannot be unmixed.
_MIN_STAIN_ANGLE_DEGREES = 2.0
_MIN_MAX_CONCENTRATION = 1e-3


class StainReferenceError(UserInputError):
    """Raised when a stain reference cannot be fitted or read (the message names the file or parameter)."""


@dataclass(frozen=True)
class StainReference:
    """The stain appearance every tile is normalized to.

    Attributes:
        stain_matrix: ``(3, 2)`` unit optical-density vectors of hematoxylin (column 0) and eosin (column 1).
        max_concentrations: ``(2,)`` 99th-percentile concentrations of hematoxylin and eosin.
        background_intensity: ``Io``, the transmitted light intensity.
        alpha: percentile of the robust stain angles.
        beta: optical density below which a pixel is background when fitting.
        method: always ``"macenko"``.
        source: ``"fit"`` or the reference tile's path.
        fitted_on: names of the tiles the reference was fitted on.
        skipped: names of chosen tiles left out of the fit as degenerate.
    """

    stain_matrix: np.ndarray
    max_concentrations: np.ndarray
    background_intensity: float = DEFAULT_BACKGROUND_INTENSITY
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    method: str = "macenko"
    source: str = "fit"
    fitted_on: tuple[str, ...] = field(default_factory=tuple)
    skipped: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (``from_dict`` reads it back)."""
        return {
            "method": self.method,
            "stain_matrix": np.asarray(self.stain_matrix, dtype=np.float64).round(8).tolist(),
            "stain_matrix_columns": ["hematoxylin", "eosin"],
            "stain_matrix_rows": ["red", "green", "blue"],
            "max_concentrations": np.asarray(self.max_concentrations, dtype=np.float64).round(8).tolist(),
            "background_intensity": float(self.background_intensity),
            "alpha": float(self.alpha),
            "beta": float(self.beta),
            "source": self.source,
            "fitted_on": list(self.fitted_on),
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source_name: str = "stain reference") -> StainReference:
        """Reads a mapping written by :meth:`to_dict`.

        Raises:
            StainReferenceError: naming ``source_name`` and the bad field.
        """
        try:
            stain_matrix = np.asarray(data["stain_matrix"], dtype=np.float64)
            max_concentrations = np.asarray(data["max_concentrations"], dtype=np.float64)
            reference = cls(
                stain_matrix=stain_matrix,
                max_concentrations=max_concentrations,
                background_intensity=float(data["background_intensity"]),
                alpha=float(data["alpha"]),
                beta=float(data["beta"]),
                method=str(data.get("method", "macenko")),
                source=str(data.get("source", "fit")),
                fitted_on=tuple(str(name) for name in data.get("fitted_on", [])),
                skipped=tuple(str(name) for name in data.get("skipped", [])),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise StainReferenceError(f"{source_name}: missing or malformed field ({error})") from None
        if stain_matrix.shape != (3, 2) or not np.all(np.isfinite(stain_matrix)):
            raise StainReferenceError(f"{source_name}: stain_matrix must be finite 3x2, got shape {stain_matrix.shape}")
        if max_concentrations.shape != (2,) or not np.all(max_concentrations > 0):
            raise StainReferenceError(f"{source_name}: max_concentrations must be 2 positive numbers")
        if reference.method != "macenko":
            raise StainReferenceError(f"{source_name}: method {reference.method!r}, expected 'macenko'")
        return reference


# ------------------------------------------------------------------------------------------ macenko
@dataclass(frozen=True)
class _TileStains:
    """One tile's Macenko estimate, or why there is none."""

    stain_matrix: np.ndarray | None
    concentrations: np.ndarray | None  # (2, N) float32, every pixel
    max_concentrations: np.ndarray | None
    reason: str = ""


def _estimate_stains(
    image: np.ndarray, background_intensity: float, alpha: float, beta: float, min_tissue_fraction: float
) -> _TileStains:
    """Macenko's stain matrix and concentrations of one tile; ``reason`` says why a tile is degenerate."""
    table = optical_density_table(background_intensity)
    flat = check_rgb(image).reshape(-1, 3)
    pixels = table[flat]
    # Optical density falls with intensity, so "every channel >= beta" is "brightest channel <= cutoff",
    # a uint8 comparison instead of a float one per channel (same pixels as torchstain's test).
    stained = np.flatnonzero(table >= beta)
    cutoff = int(stained[-1]) if stained.size else -1
    brightest = np.maximum(np.maximum(flat[:, 0], flat[:, 1]), flat[:, 2])  # faster than max(axis=1)
    tissue = pixels[brightest <= cutoff]
    needed = max(_MIN_TISSUE_PIXELS, int(np.ceil(min_tissue_fraction * len(pixels))))
    if len(tissue) < needed:
        return _TileStains(None, None, None, f"too little tissue ({len(tissue)} of {len(pixels)} pixels)")
    eigenvalues, eigenvectors = np.linalg.eigh(_covariance(tissue))
    second_spread = np.sqrt(max(float(eigenvalues[1]), 0.0))
    if not np.all(np.isfinite(eigenvalues)) or second_spread < _MIN_SECOND_SPREAD * np.linalg.norm(tissue.mean(axis=0)):
        return _TileStains(None, None, None, "one colour (no second stain direction)")
    plane = eigenvectors[:, 1:3].copy()
    if plane[:, 1].sum() < 0:  # leading eigenvector points into positive optical density
        plane[:, 1] *= -1
    projected = tissue @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [alpha, 100.0 - alpha])
    vector_low = plane @ np.array([np.cos(low), np.sin(low)])
    vector_high = plane @ np.array([np.cos(high), np.sin(high)])
    # Hematoxylin absorbs more red than eosin does (torchstain's heuristic).
    if vector_low[0] > vector_high[0]:
        stain_matrix = np.stack([vector_low, vector_high], axis=1)
    else:
        stain_matrix = np.stack([vector_high, vector_low], axis=1)
    cosine = float(np.clip(stain_matrix[:, 0] @ stain_matrix[:, 1], -1.0, 1.0))
    if np.degrees(np.arccos(cosine)) < _MIN_STAIN_ANGLE_DEGREES:
        return _TileStains(None, None, None, "stain vectors coincide")
    concentrations = _concentrations(pixels, stain_matrix)
    max_concentrations = _row_percentile(concentrations, MAX_CONCENTRATION_PERCENTILE)
    if not np.all(np.isfinite(max_concentrations)) or np.any(max_concentrations < _MIN_MAX_CONCENTRATION):
        return _TileStains(None, None, None, "a stain is absent (maximum concentration ~0)")
    return _TileStains(stain_matrix, concentrations, max_concentrations)


def _covariance(samples: np.ndarray) -> np.ndarray:
    # np.cov's unbiased estimate from one matrix product (np.cov is several times slower on (N, 3)).
    centred = samples - samples.mean(axis=0)
    return (centred.T @ centred) / (len(samples) - 1)


def _row_percentile(values: np.ndarray, percentile: float) -> np.ndarray:
    """np.percentile(values, percentile, axis=1) (linear interpolation) from one partial sort per row."""
    position = percentile / 100.0 * (values.shape[1] - 1)
    below = int(np.floor(position))
    above = min(below + 1, values.shape[1] - 1)
    parted = np.partition(values, [below, above], axis=1).astype(np.float64)
    return parted[:, below] + (position - below) * (parted[:, above] - parted[:, below])


def _concentrations(pixels: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    # The pseudo-inverse gives lstsq's solution for a full-rank 3x2 matrix, without a solver per call.
    unmix = np.linalg.pinv(stain_matrix).astype(np.float32)
    return unmix @ pixels.T.astype(np.float32)


def fit_stain_reference(
    images: Sequence[np.ndarray],
    names: Sequence[str] | None = None,
    background_intensity: float = DEFAULT_BACKGROUND_INTENSITY,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION,
    source: str = "fit",
) -> StainReference:
    """Fits the reference stain appearance on one or more tiles.

    Each tile is fitted on its own; the reference matrix is the element-wise median of their unit stain
    vectors, renormalized, and the maximum concentrations the median of each tile's 99th percentile under
    that matrix. One tile gives torchstain's ``fit``.

    Args:
        images: uint8 RGB tiles (training tiles only: never the test partition).
        names: the tiles' names, recorded in the reference; ``tile_<i>`` by default.
        background_intensity: ``Io``.
        alpha: percentile of the robust stain angles.
        beta: optical density below which a pixel is background.
        min_tissue_fraction: tiles with less tissue are left out as degenerate.
        source: ``"fit"`` or the path of a reference tile, recorded in the reference.

    Returns:
        The reference.

    Raises:
        StainReferenceError: if no tile is given or every tile is degenerate.
    """
    if names is None:
        names = [f"tile_{index}" for index in range(len(images))]
    if len(names) != len(images):
        raise ValueError(f"{len(images)} images but {len(names)} names")
    if not images:
        raise StainReferenceError(f"normalize.reference {source!r}: no tiles to fit the stain reference on")
    estimates: list[tuple[str, np.ndarray, _TileStains]] = []
    skipped: list[str] = []
    reasons: list[str] = []
    for name, image in zip(names, images, strict=True):
        estimate = _estimate_stains(image, background_intensity, alpha, beta, min_tissue_fraction)
        if estimate.stain_matrix is None:
            skipped.append(name)
            reasons.append(f"{name}: {estimate.reason}")
        else:
            estimates.append((name, image, estimate))
    if not estimates:
        raise StainReferenceError(
            f"normalize.reference {source!r}: every tile is degenerate, cannot fit a stain reference "
            f"({'; '.join(reasons[:3])})"
        )
    if len(estimates) == 1:
        stain_matrix = estimates[0][2].stain_matrix
        max_concentrations = estimates[0][2].max_concentrations
    else:
        # Only tiles with a stain matrix are in ``estimates``.
        matrices = [cast(np.ndarray, estimate.stain_matrix) for _, _, estimate in estimates]
        median = np.median(np.stack(matrices), axis=0)
        stain_matrix = median / np.linalg.norm(median, axis=0, keepdims=True)
        # Each tile's own maxima refer to its own matrix; under the median matrix they are recomputed.
        table = optical_density_table(background_intensity)
        per_tile_max = [
            _row_percentile(_concentrations(table[image.reshape(-1, 3)], stain_matrix), MAX_CONCENTRATION_PERCENTILE)
            for _, image, _ in estimates
        ]
        max_concentrations = np.median(np.stack(per_tile_max), axis=0).astype(np.float64)
    return StainReference(
        stain_matrix=np.asarray(stain_matrix, dtype=np.float64),
        max_concentrations=np.asarray(max_concentrations, dtype=np.float64),
        background_intensity=float(background_intensity),
        alpha=float(alpha),
        beta=float(beta),
        source=source,
        fitted_on=tuple(name for name, _, _ in estimates),
        skipped=tuple(skipped),
    )


def normalize_tile(
    image: np.ndarray,
    reference: StainReference | None,
    min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION,
) -> tuple[np.ndarray, bool]:
    """Renders a tile with the reference's stains (Macenko).

    Args:
        image: uint8 RGB ``(H, W, 3)``.
        reference: the reference; ``None`` (method ``none``) returns the tile unchanged.
        min_tissue_fraction: below this fraction of stained pixels the tile is degenerate.

    Returns:
        ``(tile, normalized)``: a uint8 RGB tile of the same shape, and False where the tile was passed
        through unchanged (method none, or a degenerate tile: too little tissue, one colour, saturated).
    """
    image = check_rgb(image)
    if reference is None:
        return image.copy(), False
    estimate = _estimate_stains(
        image, reference.background_intensity, reference.alpha, reference.beta, min_tissue_fraction
    )
    if estimate.stain_matrix is None:
        return image.copy(), False
    scale = (reference.max_concentrations / estimate.max_concentrations).astype(np.float32)
    density = reference.stain_matrix.astype(np.float32) @ (estimate.concentrations * scale[:, None])
    rendered = np.float32(reference.background_intensity) * np.exp(-density)
    if not np.all(np.isfinite(rendered)):
        return image.copy(), False
    rendered = np.clip(np.rint(rendered), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rendered.T.reshape(image.shape)), True


def degenerate_reason(
    image: np.ndarray, reference: StainReference, min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION
) -> str:
    """Why :func:`normalize_tile` passes a tile through ("" when it does not)."""
    return _estimate_stains(
        image, reference.background_intensity, reference.alpha, reference.beta, min_tissue_fraction
    ).reason


# --------------------------------------------------------------------------------------------- files
def save_stain_reference(
    path: str | Path, reference: StainReference | None, settings: dict[str, Any] | None = None
) -> None:
    """Writes the reference as JSON, atomically; ``None`` writes ``{"method": "none"}``.

    Args:
        path: the JSON file.
        reference: the reference, or None for method none.
        settings: recorded beside it so that new tiles are treated the same way: ``tissue`` (keyword
            arguments of :func:`weakseg.tissue.tissue_mask`) and ``min_tissue_fraction``.
    """
    document = {"method": "none"} if reference is None else reference.to_dict()
    document.update(settings or {})
    write_json(path, document)


def load_normalize_settings(path: str | Path) -> dict[str, Any]:
    """The settings :func:`save_stain_reference` recorded (``tissue``, ``min_tissue_fraction``), or {}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StainReferenceError(f"{path}: cannot read the stain reference ({error})") from None
    return {key: data[key] for key in ("tissue", "min_tissue_fraction") if key in data}


def load_stain_reference(path: str | Path) -> StainReference | None:
    """Reads a reference written by :func:`save_stain_reference`.

    Returns:
        The reference, or None where the file says method ``none`` (tiles pass through unchanged).

    Raises:
        StainReferenceError: naming the file, if it is missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise StainReferenceError(f"{path}: stain reference file not found (run the normalize stage)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StainReferenceError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise StainReferenceError(f"{path}: expected a JSON object")
    if data.get("method") == "none":
        return None
    return StainReference.from_dict(data, str(path))
