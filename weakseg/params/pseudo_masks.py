"""The ``cam`` and ``refine`` sections of ``params.yaml``: class activation maps, and the pseudo-masks from them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from weakseg.params.base import _key_error, _Strict

# Said by the params check (no size anywhere) and by weakseg.cam_batches when called without one.
CROP_EVIDENCE_NEEDS_A_SIZE = (
    "cam.method crop_evidence needs cam.evidence_crop_size, or classifier.crop_size to take half of"
)


# ---------------------------------------------------------------------------------------------- cam
class CamParams(_Strict):
    """Stage 2: class activation maps from the classifier."""

    method: Literal["smoothgradcampp", "gradcam", "gradcampp", "scorecam", "layercam", "crop_evidence"] = Field(
        "smoothgradcampp",
        description="A torchcam method on cam.target_layer (the paper: smoothgradcampp), or 'crop_evidence': the "
        "classifier slid over the tile on crops of cam.evidence_crop_size, each pixel the mean logit of the "
        "crops that hold it.",
    )
    evidence_crop_size: int | None = Field(
        None,
        ge=8,
        description="For method crop_evidence: the side of the sliding crops (a quarter of it the step between "
        "them); null: half of classifier.crop_size.",
    )
    num_samples: int = Field(4, ge=1, description="Smooth Grad-CAM++ noise samples.")
    std: float = Field(0.3, gt=0.0, description="Smooth Grad-CAM++ noise standard deviation.")
    target_layer: str = Field("layer4", min_length=1)
    batch_size: int = Field(16, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    normal_reference_quantile: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="For refine.background_quantile: auto. The quantile of the validation negatives' tissue "
        "evidence (the classifier's logit at each position) below which a positive tile's tissue counts as "
        "normal-looking (metrics/cams.json).",
    )
    negative_train_tiles: bool = Field(
        False,
        description="Also compute CAMs for negative train tiles; refine_masks gives them empty pseudo-masks "
        "either way, so this only costs time (the figures' negative tile always gets its CAM).",
    )
    test_time_augmentation: Literal["none", "dihedral"] = Field(
        "none",
        description="'dihedral': each CAM is the mean of the CAMs of the tile's eight rotations and flips, each "
        "turned back (eight times the CAM time); 'none': one CAM of the tile as it is (the paper).",
    )


# ------------------------------------------------------------------------------------------- refine
class GaussianPairwiseParams(_Strict):
    """DenseCRF smoothness term."""

    sxy: float = Field(3.0, gt=0.0)
    compat: float = Field(3.0, ge=0.0)


class BilateralPairwiseParams(_Strict):
    """DenseCRF appearance term."""

    sxy: float = Field(80.0, gt=0.0)
    srgb: float = Field(13.0, gt=0.0)
    compat: float = Field(10.0, ge=0.0)


class CrfParams(_Strict):
    """DenseCRF refinement of the pseudo-mask."""

    enabled: bool = True
    iterations: int = Field(5, ge=1, le=100)
    unary: Literal["probability", "hard"] = "probability"
    hard_confidence: float = Field(0.9, gt=0.5, lt=1.0, description="Label confidence for the 'hard' unary.")
    gaussian: GaussianPairwiseParams = GaussianPairwiseParams()
    bilateral: BilateralPairwiseParams = BilateralPairwiseParams()


class RefineParams(_Strict):
    """Stage 3: CAM -> pseudo-mask."""

    threshold_quantile: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] = Field(
        0.5,
        description="The CAM quantile (within a positive tile's tissue) above which a pixel is foreground. "
        "auto: the background quantile plus ignore_band_width (at most 1), so the foreground is what lies "
        "above the background seeds and a band of that width: as large as the tissue that does not look "
        "normal allows, on any set.",
    )
    ignore_band_width: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="For threshold_quantile: auto. The share of a positive tile's tissue, between its background "
        "seeds and its foreground, that the segmenter's loss ignores.",
    )
    restrict_to_tissue: bool = True
    opening_kernel: int = Field(3, ge=0, description="0 skips opening.")
    closing_kernel: int = Field(5, ge=0, description="0 skips closing.")
    min_object_size: int = Field(64, ge=0)
    crf: CrfParams = CrfParams()
    background_quantile: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] | None = Field(
        None,
        description="null: everything not foreground is background. A quantile in [0, threshold_quantile]: "
        "tissue pixels whose CAM is at or below it are background, the other non-foreground tissue pixels "
        "of a positive tile are ignored by the segmenter's loss (written as 128). auto: the share of a "
        "positive tile's tissue that looks normal, estimated by generate_cams on the validation split "
        "(metrics/cams.json: normal_tissue_fraction), capped at a numeric threshold_quantile.",
    )
    workers: int = Field(0, ge=0, description="Process-pool size; 0 uses every core.")
    figure_tiles: int = Field(4, ge=0, le=32)

    @model_validator(mode="after")
    def _band_below_foreground(self) -> RefineParams:
        if self.threshold_quantile == "auto" and self.background_quantile is None:
            raise _key_error(
                "RefineParams",
                ("threshold_quantile",),
                self.threshold_quantile,
                "auto places the foreground above the background seeds, so refine.background_quantile must be "
                "a number or auto, not null",
            )
        if (
            isinstance(self.background_quantile, float)
            and isinstance(self.threshold_quantile, float)
            and self.background_quantile > self.threshold_quantile
        ):
            raise _key_error(
                "RefineParams",
                ("background_quantile",),
                self.background_quantile,
                f"must be <= refine.threshold_quantile ({self.threshold_quantile}): the background lies below "
                "the foreground's cut",
            )
        return self
