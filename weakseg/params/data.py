"""The ``data``, ``split`` and ``normalize`` sections of ``params.yaml``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from weakseg.params.base import _Strict


# --------------------------------------------------------------------------------------------- data
class SyntheticSourceParams(_Strict):
    """The seeded H&E-like demo dataset with pixel truth."""

    num_tiles: int = Field(200, ge=4, le=1_000_000)
    positive_fraction: float = Field(0.31, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.31, gt=0.0, lt=1.0)
    tile_size: int = Field(128, ge=32, le=2048)
    label_noise: float = Field(0.0, ge=0.0, lt=0.5)
    seed: int = Field(0, ge=0)


class MhistSourceParams(_Strict):
    """The real MHIST dataset, from a local folder or zip, or from the URLs of MHIST's e-mail."""

    path: str = ""
    images_url: str = ""
    annotations_url: str = ""
    md5sums_url: str = ""
    check_counts: bool = True


class FolderSourceParams(_Strict):
    """Any dataset already in MHIST's layout."""

    path: str = ""


class DataParams(_Strict):
    """Where the tiles come from and which label is the positive class."""

    source: Literal["synthetic", "mhist", "folder"] = "synthetic"
    positive_label: str = Field("SSA", min_length=1)
    tile_size: int | None = Field(None, ge=16, le=8192, description="Expected tile size; None accepts any.")
    synthetic: SyntheticSourceParams = SyntheticSourceParams()
    mhist: MhistSourceParams = MhistSourceParams()
    folder: FolderSourceParams = FolderSourceParams()


class SplitParams(_Strict):
    """The validation split carved from the ``train`` partition (stratified, seeded)."""

    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = Field(42, ge=0)


# ---------------------------------------------------------------------------------------- normalize
class TissueParams(_Strict):
    """Tissue versus background (white glass, lumen)."""

    min_object_size: int = Field(64, ge=0)
    min_hole_size: int = Field(64, ge=0)
    threshold_min: float = Field(0.15, ge=0.0, description="Lowest optical-density threshold (Otsu is clipped).")
    threshold_max: float = Field(0.3, ge=0.0, description="Highest optical-density threshold (Otsu is clipped).")
    min_green_excess: float | None = Field(
        0.1, ge=-1.0, le=1.0, description="Stain colour test: OD_green - OD_blue > this * |OD|; null skips it."
    )

    @model_validator(mode="after")
    def _ordered(self) -> TissueParams:
        if self.threshold_max < self.threshold_min:
            raise ValueError(f"threshold_max ({self.threshold_max}) must be >= threshold_min ({self.threshold_min})")
        return self


class NormalizeParams(_Strict):
    """Macenko stain normalization and tissue masking."""

    method: Literal["macenko", "none"] = "macenko"
    reference: str = Field("fit", description="'fit' on the train partition, or the path of a reference tile.")
    fit_tiles: int = Field(64, ge=1, description="How many train tiles the reference is fitted on.")
    seed: int = Field(0, ge=0, description="Chooses the fit tiles and the figure's tiles.")
    background_intensity: int = Field(240, ge=1, le=255, description="Io, the transmitted light intensity.")
    alpha: float = Field(1.0, gt=0.0, lt=50.0, description="Percentile for the robust stain angles.")
    beta: float = Field(0.15, gt=0.0, description="Optical density below which a pixel is background.")
    min_tissue_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="Tiles with fewer stained pixels (every channel OD >= beta) pass through."
    )
    workers: int = Field(0, ge=0, description="Process-pool size; 0 uses every core.")
    tissue: TissueParams = TissueParams()
    figure_tiles: int = Field(3, ge=0, le=20)
