"""New tiles prepared as the normalize stage prepared the training tiles: the recorded settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from weakseg import tile_preparation
from weakseg.stain import StainReference, StainReferenceError, save_stain_reference

DEFAULT_SETTINGS: dict[str, Any] = {
    "tissue": tile_preparation.default_normalization().tissue,
    "min_tissue_fraction": tile_preparation.default_normalization().min_tissue_fraction,
}


def test_reference_without_tissue_settings_is_refused_naming_the_file(tmp_path: Path) -> None:
    reference = StainReference(np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]), np.array([1.9, 1.0]))
    save_stain_reference(tmp_path / "bare.json", reference)
    with pytest.raises(StainReferenceError, match=r"bare\.json.*tissue"):
        tile_preparation.load_normalization(tmp_path / "bare.json")
    save_stain_reference(
        tmp_path / "odd.json", reference, settings={**DEFAULT_SETTINGS, "tissue": {"min_object_size": 4}}
    )
    with pytest.raises(StainReferenceError, match=r"odd\.json.*threshold_min"):
        tile_preparation.load_normalization(tmp_path / "odd.json")
    bad_values = {
        **DEFAULT_SETTINGS,
        "tissue": {**DEFAULT_SETTINGS["tissue"], "threshold_min": 0.5, "threshold_max": 0.2},
    }
    save_stain_reference(tmp_path / "bad.json", reference, settings=bad_values)
    with pytest.raises(StainReferenceError, match=r"bad\.json.*threshold_max"):
        tile_preparation.load_normalization(tmp_path / "bad.json")
