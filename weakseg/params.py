"""The typed schema of ``params.yaml``.

Every stage validates the whole file with :func:`load_params` before it does anything, so an unknown key,
a wrong type or an out-of-range value stops the stage with a message naming the key and what was
expected, and nothing is written. A stage then sees only the sections it declares under ``params`` in
``dvc.yaml`` (:func:`load_stage_params`), so DVC's change tracking and what the code reads cannot drift
apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from weakseg.errors import UserInputError


class ParamsError(UserInputError):
    """Raised when ``params.yaml`` does not match the schema."""


class _Strict(BaseModel):
    """Base model: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


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
    def _ordered(self) -> "TissueParams":
        if self.threshold_max < self.threshold_min:
            raise ValueError(
                f"threshold_max ({self.threshold_max}) must be >= threshold_min ({self.threshold_min})"
            )
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


# ---------------------------------------------------------------------------------------- classifier
ResNetName = Literal["resnet18", "resnet34", "resnet50", "resnet101"]


class FocalTverskyParams(_Strict):
    """Focal Tversky loss: alpha weighs false negatives, beta false positives."""

    alpha: float = Field(0.7, ge=0.0, le=1.0)
    beta: float = Field(0.3, ge=0.0, le=1.0)
    gamma: float = Field(1.33, gt=0.0)


class UnfreezeParams(_Strict):
    """Progressive unfreezing of a pretrained backbone."""

    frozen_epochs: int = Field(5, ge=0, description="Epochs with only the head training.")
    full_epoch: int = Field(25, ge=0, description="Epoch from which every layer trains.")
    enabled: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> "UnfreezeParams":
        if self.full_epoch < self.frozen_epochs:
            raise ValueError(
                f"full_epoch ({self.full_epoch}) must be >= frozen_epochs ({self.frozen_epochs})"
            )
        return self


class AugmentParams(_Strict):
    """Albumentations augmentation, seeded per run."""

    flips: bool = True
    rotate90: bool = True
    color_jitter: float = Field(0.1, ge=0.0, le=1.0, description="Brightness/contrast/saturation jitter.")
    hue_jitter: float = Field(0.02, ge=0.0, le=0.5)


class DistributedParams(_Strict):
    """PyTorch distributed training (torchrun)."""

    processes_per_node: int = Field(1, ge=1, le=64)
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class ClassifierParams(_Strict):
    """Stage 1: a ResNet classifier of the tile label."""

    arch: ResNetName = "resnet18"
    weights: str = Field("none", description="'imagenet', 'none', or the path of a local weights file.")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="The paper's SGD; AdamW learns faster from scratch (the CPU demo)."
    )
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    bce_weight: float = Field(1.0, ge=0.0)
    focal_tversky_weight: float = Field(1.0, ge=0.0)
    focal_tversky: FocalTverskyParams = FocalTverskyParams()
    unfreeze: UnfreezeParams = UnfreezeParams()
    augment: AugmentParams = AugmentParams()
    selection_metric: Literal["balanced_accuracy", "auc", "accuracy", "loss"] = "balanced_accuracy"
    num_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = Field(False, description="bf16 autocast on CUDA; ignored on CPU.")
    distributed: DistributedParams = DistributedParams()

    @model_validator(mode="after")
    def _some_loss(self) -> "ClassifierParams":
        if self.bce_weight == 0 and self.focal_tversky_weight == 0:
            raise ValueError("bce_weight and focal_tversky_weight cannot both be 0")
        return self


# ---------------------------------------------------------------------------------------------- cam
class CamParams(_Strict):
    """Stage 2: class activation maps from the classifier."""

    method: Literal["smoothgradcampp", "gradcam", "gradcampp", "scorecam", "layercam"] = "smoothgradcampp"
    num_samples: int = Field(4, ge=1, description="Smooth Grad-CAM++ noise samples.")
    std: float = Field(0.3, gt=0.0, description="Smooth Grad-CAM++ noise standard deviation.")
    target_layer: str = Field("layer4", min_length=1)
    batch_size: int = Field(16, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


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

    threshold_quantile: float = Field(0.5, ge=0.0, le=1.0)
    restrict_to_tissue: bool = True
    opening_kernel: int = Field(3, ge=0, description="0 skips opening.")
    closing_kernel: int = Field(5, ge=0, description="0 skips closing.")
    min_object_size: int = Field(64, ge=0)
    crf: CrfParams = CrfParams()
    workers: int = Field(0, ge=0, description="Process-pool size; 0 uses every core.")
    figure_tiles: int = Field(4, ge=0, le=32)


# ---------------------------------------------------------------------------------------- segmenter
class SegmenterLossParams(_Strict):
    """Weights of the segmenter's loss terms."""

    dice: float = Field(1.0, ge=0.0)
    lovasz: float = Field(0.5, ge=0.0)
    classification: float = Field(0.2, ge=0.0)


class CurriculumParams(_Strict):
    """Positive tiles first, then negatives at a rising probability."""

    positive_only_epochs: int = Field(10, ge=0)
    final_negative_probability: float = Field(0.3, ge=0.0, le=1.0)


class SegmenterParams(_Strict):
    """Stage 4: DeepLabv3+ trained on the pseudo-masks."""

    encoder: ResNetName = "resnet18"
    weights: str = Field(
        "none",
        description="'imagenet', 'none', or the path of a local weights file (models/classifier.pt reuses "
        "the trained classifier's backbone as the encoder).",
    )
    epochs: int = Field(35, ge=1)
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="The paper's SGD, or AdamW.")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-3, ge=0.0)
    grad_clip_norm: float = Field(1.0, ge=0.0, description="0 disables clipping.")
    loss: SegmenterLossParams = SegmenterLossParams()
    curriculum: CurriculumParams = CurriculumParams()
    augment: AugmentParams = AugmentParams()
    early_stopping_patience: int = Field(10, ge=1)
    num_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = False
    distributed: DistributedParams = DistributedParams()


# ----------------------------------------------------------------------------------------- evaluate
class EvaluateParams(_Strict):
    """Scoring on the test partition."""

    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    min_foreground_pixels: int = Field(64, ge=0, description="Tile positive if the prediction has more.")
    figure_tiles: int = Field(4, ge=1, le=32, description="Test tiles per class in the figures.")
    figure_seed: int = Field(0, ge=0)
    batch_size: int = Field(16, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


# ------------------------------------------------------------------------------------------- whole
class Params(_Strict):
    """The whole of ``params.yaml``."""

    seed: int = Field(42, ge=0)
    data: DataParams = DataParams()
    split: SplitParams = SplitParams()
    normalize: NormalizeParams = NormalizeParams()
    classifier: ClassifierParams = ClassifierParams()
    cam: CamParams = CamParams()
    refine: RefineParams = RefineParams()
    segmenter: SegmenterParams = SegmenterParams()
    evaluate: EvaluateParams = EvaluateParams()


def _format_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling against params.yaml's documented keys)"
        got = item.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {message}{got_text}")
    return "\n".join(lines)


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validates a mapping against the schema.

    Args:
        raw: the parsed YAML document.
        source: a name for messages (the file path).

    Returns:
        The validated parameters.

    Raises:
        ParamsError: naming each bad key and what was expected.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(_format_error(error, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Reads and validates a params file.

    Raises:
        ParamsError: if the file is missing, is not YAML, or does not match the schema.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw, str(path))


class StageParams:
    """A read-only view of :class:`Params` that refuses sections a stage did not declare.

    A stage that reads a key DVC does not know about would not re-run when that key changes; this view
    turns such a mistake into an immediate error.
    """

    def __init__(self, params: Params, declared: list[str], stage: str) -> None:
        self._params = params
        self._stage = stage
        self._declared = {name.split(".")[0] for name in declared}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._declared:
            raise ParamsError(
                f"stage '{self._stage}' reads params '{name}' but dvc.yaml does not declare it "
                f"(declared: {sorted(self._declared)})"
            )
        return getattr(self._params, name)

    @property
    def declared(self) -> set[str]:
        """Top-level sections this stage may read."""
        return set(self._declared)

    def to_flat_dict(self) -> dict[str, Any]:
        """The declared sections as ``{"a.b.c": value}``, for MLflow."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, inner in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, inner)
            else:
                flat[prefix] = value

        dumped = self._params.model_dump()
        for name in sorted(self._declared):
            walk(name, dumped[name])
        return flat


def declared_params(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The ``params`` entries of one stage in ``dvc.yaml``."""
    document = yaml.safe_load(Path(dvc_yaml).read_text())
    try:
        entries = document["stages"][stage].get("params", [])
    except KeyError:
        raise ParamsError(f"{dvc_yaml}: no stage named '{stage}'") from None
    names: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            names.append(entry)
        elif isinstance(entry, dict):  # {"other.yaml": [keys]}
            for keys in entry.values():
                names.extend(keys)
    return names


def load_stage_params(
    stage: str, params_path: str | Path = "params.yaml", dvc_yaml: str | Path = "dvc.yaml"
) -> StageParams:
    """Validates the whole params file and returns the view a stage is allowed to read."""
    params = load_params(params_path)
    return StageParams(params, declared_params(stage, dvc_yaml), stage)
