"""New tiles prepared as the ``normalize`` stage prepared the training tiles: stain and tissue.

The ``normalize`` stage records its stain reference and tissue settings in ``stain_reference.json``;
:func:`load_normalization` reads both, so the ``predict`` command normalizes new tiles and finds their
tissue exactly as the models' training tiles were.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from weakseg.params import NormalizeParams, TissueParams
from weakseg.stain import (
    StainReference,
    StainReferenceError,
    load_normalize_settings,
    load_stain_reference,
    normalize_tile,
)
from weakseg.tissue import tissue_mask

# The keyword arguments of weakseg.tissue.tissue_mask that the normalize stage records.
TISSUE_SETTING_KEYS = (
    "min_object_size",
    "min_hole_size",
    "background_intensity",
    "threshold_min",
    "threshold_max",
    "min_green_excess",
)


@dataclass(frozen=True)
class TileNormalization:
    """How a new tile is prepared: the stain reference and tissue settings the ``normalize`` stage used.

    Attributes:
        reference: the stain reference; None leaves tiles unnormalized (``normalize.method: none``, or
            ``--stain-reference none``).
        tissue: keyword arguments of :func:`weakseg.tissue.tissue_mask` (:data:`TISSUE_SETTING_KEYS`).
        min_tissue_fraction: a tile with fewer stained pixels passes through unnormalized.
        source: the file these came from, or ``"defaults"``.
    """

    reference: StainReference | None
    tissue: dict[str, Any]
    min_tissue_fraction: float
    source: str


def default_normalization() -> TileNormalization:
    """No stain reference, and the tissue settings of the default ``normalize`` parameters."""
    defaults = NormalizeParams()
    tissue = {key: getattr(defaults.tissue, key) for key in TISSUE_SETTING_KEYS if key != "background_intensity"}
    tissue["background_intensity"] = defaults.background_intensity
    return TileNormalization(None, tissue, defaults.min_tissue_fraction, "defaults")


def load_normalization(path: Path) -> TileNormalization:
    """The stain reference and the tissue settings recorded beside it in ``stain_reference.json``.

    Raises:
        StainReferenceError: naming the file, if it is missing or malformed, or records no (or unusable)
            tissue settings: predict would then find tissue differently from the tiles the models saw.
    """
    reference = load_stain_reference(path)
    settings = load_normalize_settings(path)
    missing = [key for key in ("tissue", "min_tissue_fraction") if key not in settings]
    if missing:
        raise StainReferenceError(
            f"{path}: records no {' or '.join(missing)}, so tiles cannot be prepared as the normalize stage "
            f"prepared the training tiles; use a stain_reference.json written by the normalize stage "
            f"(or --stain-reference none for no normalization and default tissue settings)"
        )
    tissue = settings["tissue"]
    if not isinstance(tissue, dict) or set(tissue) != set(TISSUE_SETTING_KEYS):
        found = sorted(tissue) if isinstance(tissue, dict) else type(tissue).__name__
        raise StainReferenceError(f"{path}: 'tissue' must hold exactly {list(TISSUE_SETTING_KEYS)}, got {found}")
    try:
        checked = NormalizeParams(
            background_intensity=tissue["background_intensity"],
            min_tissue_fraction=settings["min_tissue_fraction"],
            tissue=TissueParams(**{key: tissue[key] for key in TISSUE_SETTING_KEYS if key != "background_intensity"}),
        )
    except ValidationError as error:
        problems = "; ".join(
            ": ".join(filter(None, (".".join(str(part) for part in item["loc"]), item["msg"])))
            for item in error.errors()
        )
        raise StainReferenceError(f"{path}: unusable tissue settings ({problems})") from None
    return TileNormalization(reference, dict(tissue), checked.min_tissue_fraction, str(path))


@dataclass
class PreparedImage:
    """One input image ready for the model, with what its outputs need."""

    name: str
    original: np.ndarray
    normalized: np.ndarray
    tissue: np.ndarray | None
    stain_normalized: bool


def prepare_image(
    image: np.ndarray, name: str, normalization: TileNormalization, tissue_masking: bool = True
) -> PreparedImage:
    """Stain-normalizes one image and finds its tissue, as the ``normalize`` stage does for training tiles.

    The tissue mask is computed on the image as read (not the normalized one), as ``normalize`` does.
    """
    normalized, was_normalized = normalize_tile(image, normalization.reference, normalization.min_tissue_fraction)
    tissue = tissue_mask(image, **normalization.tissue) if tissue_masking else None
    return PreparedImage(name, image, normalized, tissue, was_normalized)
