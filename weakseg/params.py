"""The typed schema of ``params.yaml``.

Every stage validates the whole file with :func:`load_params` before it does anything, so an unknown key,
a wrong type or an out-of-range value stops the stage with a message naming the key and what was
expected, and nothing is written. A stage then sees only the keys it declares under ``params`` in
``dvc.yaml`` (:func:`load_stage_params`; a declared section gives everything under it), so DVC's change
tracking and what the code reads cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from weakseg.errors import UserInputError


class ParamsError(UserInputError):
    """Raised when ``params.yaml`` does not match the schema."""


class _Strict(BaseModel):
    """Base model: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _key_error(model: str, key: tuple[str, ...], value: Any, message: str) -> ValidationError:
    """A validation error located at ``key`` (relative to the model), for checks that span several keys.

    Raised from a model validator, pydantic prefixes the location with the model's own place in
    ``params.yaml``, so the message names the full dotted key (``classifier.unfreeze.full_epoch``).
    """
    detail = InitErrorDetails(
        type=PydanticCustomError("value_order", "{message}", {"message": message}), loc=key, input=value
    )
    return ValidationError.from_exception_data(model, [detail])


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
    """Progressive unfreezing of a pretrained backbone (``weakseg.training.classifier.trainable_groups``).

    Epochs are counted from 0; ``full_epoch`` must lie before the last epoch (``ClassifierParams`` checks it),
    or the last step (``layer1`` and the stem) never trains.
    """

    frozen_epochs: int = Field(5, ge=0, description="Epochs with only the head training.")
    full_epoch: int = Field(25, ge=0, description="Epoch (from 0) from which every layer trains.")
    enabled: bool = Field(False, description="Off by default: it only helps a pretrained backbone.")

    @model_validator(mode="after")
    def _ordered(self) -> "UnfreezeParams":
        if self.enabled and self.full_epoch < self.frozen_epochs:
            raise _key_error(
                "UnfreezeParams",
                ("full_epoch",),
                self.full_epoch,
                f"must be >= frozen_epochs ({self.frozen_epochs}): the layers unfreeze between the two",
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
    balance: Literal["none", "sampler", "weight"] = Field(
        "none",
        description="Class imbalance of the training split: 'none'; 'sampler', each epoch a seeded class-balanced "
        "draw (with replacement) of as many tiles as the split holds; 'weight', the BCE term's pos_weight = "
        "negatives / positives of the training split (the Focal Tversky term is unchanged).",
    )
    num_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = Field(False, description="bf16 autocast (CUDA, or a CPU with native bf16).")
    distributed: DistributedParams = DistributedParams()

    @model_validator(mode="after")
    def _some_loss(self) -> "ClassifierParams":
        if self.bce_weight == 0 and self.focal_tversky_weight == 0:
            raise ValueError("bce_weight and focal_tversky_weight cannot both be 0")
        return self

    @model_validator(mode="after")
    def _unfreeze_within_epochs(self) -> "ClassifierParams":
        if self.unfreeze.enabled and self.unfreeze.full_epoch >= self.epochs:
            raise _key_error(
                "ClassifierParams",
                ("unfreeze", "full_epoch"),
                self.unfreeze.full_epoch,
                f"must be < classifier.epochs ({self.epochs}): epochs run 0..{self.epochs - 1}, and layer1 and "
                "the stem only train from full_epoch on",
            )
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
    negative_train_tiles: bool = Field(
        False,
        description="Also compute CAMs for negative train tiles; refine_masks gives them empty pseudo-masks "
        "either way, so this only costs time (the figures' negative tile always gets its CAM).",
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

    threshold_quantile: float = Field(0.5, ge=0.0, le=1.0)
    restrict_to_tissue: bool = True
    opening_kernel: int = Field(3, ge=0, description="0 skips opening.")
    closing_kernel: int = Field(5, ge=0, description="0 skips closing.")
    min_object_size: int = Field(64, ge=0)
    crf: CrfParams = CrfParams()
    background_quantile: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="null: everything not foreground is background. A quantile in [0, threshold_quantile]: "
        "tissue pixels whose CAM is at or below it are background, the other non-foreground tissue pixels "
        "of a positive tile are ignored by the segmenter's loss (written as 128).",
    )
    workers: int = Field(0, ge=0, description="Process-pool size; 0 uses every core.")
    figure_tiles: int = Field(4, ge=0, le=32)

    @model_validator(mode="after")
    def _band_below_foreground(self) -> "RefineParams":
        if self.background_quantile is not None and self.background_quantile > self.threshold_quantile:
            raise _key_error(
                "RefineParams",
                ("background_quantile",),
                self.background_quantile,
                f"must be <= refine.threshold_quantile ({self.threshold_quantile}): the background lies below "
                "the foreground's cut",
            )
        return self


# ---------------------------------------------------------------------------------------- segmenter
class SegmenterLossParams(_Strict):
    """Weights of the segmenter's loss terms."""

    dice: float = Field(1.0, ge=0.0)
    lovasz: float = Field(0.5, ge=0.0)
    classification: float = Field(0.2, ge=0.0)
    multiple_instance: float = Field(
        0.0, ge=0.0, description="Weight of the multiple-instance term: BCE of each tile's top-fraction pooled "
        "logit against its label (0: off)."
    )
    multiple_instance_top_fraction: float = Field(0.2, gt=0.0, le=1.0)
    size: float = Field(
        0.0, ge=0.0, description="Weight of the size constraint: a positive tile's predicted foreground "
        "fraction of its not-background pixels is kept in [size_lower, size_upper] (0: off)."
    )
    size_lower: float = Field(0.0, ge=0.0, le=1.0)
    size_upper: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _size_bounds_in_order(self) -> "SegmenterLossParams":
        if self.size_lower > self.size_upper:
            raise _key_error(
                "SegmenterLossParams", ("size_lower",), self.size_lower,
                f"must be <= segmenter.loss.size_upper ({self.size_upper})",
            )
        return self


class CurriculumParams(_Strict):
    """Positive tiles first, then negatives at a rising probability."""

    positive_only_epochs: int = Field(10, ge=0)
    start_negative_probability: float = Field(
        0.0, ge=0.0, le=1.0, description="Where the linear ramp to final_negative_probability starts (at epoch "
        "positive_only_epochs); start = final = 1 trains on every tile in every epoch."
    )
    final_negative_probability: float = Field(0.3, ge=0.0, le=1.0)
    oversample_negatives: bool = Field(
        False,
        description="When the training set holds fewer negative tiles than positive ones, repeat each epoch's "
        "drawn negatives (seeded, with replacement) by the ratio positives / negatives.",
    )


class SegmenterParams(_Strict):
    """Stage 4: DeepLabv3+ trained on the pseudo-masks."""

    encoder: ResNetName = "resnet18"
    weights: str = Field(
        "none",
        description="'imagenet', 'none', or the path of a local weights file (models/classifier.pt reuses "
        "the trained classifier's backbone as the encoder).",
    )
    targets: Literal["pseudo", "truth"] = Field(
        "pseudo",
        description="'pseudo': the refined pseudo-masks (weak supervision); 'truth': the dataset's true masks "
        "(data/raw/masks), the fully supervised reference a weak method is measured against.",
    )
    epochs: int = Field(35, ge=1)
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="The paper's SGD, or AdamW.")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    lr_schedule: Literal["constant", "onecycle"] = Field(
        "constant", description="'onecycle': warm up to lr, then anneal towards 0, stepped per batch."
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-3, ge=0.0)
    grad_clip_norm: float = Field(1.0, ge=0.0, description="0 disables clipping.")
    loss: SegmenterLossParams = SegmenterLossParams()
    curriculum: CurriculumParams = CurriculumParams()
    augment: AugmentParams = AugmentParams()
    early_stopping_patience: int = Field(10, ge=1)
    selection_metric: Literal["iou", "loss"] = Field(
        "iou", description="The validation score that picks the best epoch: pooled IoU against the validation "
        "targets, or the validation loss (for targets with no foreground pixel)."
    )
    num_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = Field(False, description="bf16 autocast (CUDA, or a CPU with native bf16).")
    distributed: DistributedParams = DistributedParams()


# ----------------------------------------------------------------------------------------- evaluate
class EvaluateParams(_Strict):
    """Scoring on the test partition."""

    threshold: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="The segmenter's pixel threshold. Classifier decisions (scores, confusion, every gate) use "
        "the decision_threshold train_classifier chose on validation and stored in its checkpoint.",
    )
    segmenter_gate: Literal["none", "classifier"] = Field(
        "none",
        description="'classifier': the segmenter's mask of a tile the classifier calls negative is emptied "
        "(a classification gate at inference; weakseg-predict --gate does the same).",
    )
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


#: Declared keys as a tree: a name maps to ``True`` (everything under it is declared) or to a subtree.
DeclaredTree = dict[str, Any]


def declared_tree(names: list[str]) -> DeclaredTree:
    """Turns dotted names (``["seed", "data.positive_label", "refine"]``) into a :data:`DeclaredTree`.

    A name inside a section that is declared whole adds nothing; a whole section replaces its subtree.
    """
    tree: DeclaredTree = {}
    for name in names:
        *parents, last = name.split(".")
        node: DeclaredTree | None = tree
        for part in parents:
            child = node.get(part)
            if child is True:
                node = None  # an enclosing section is already declared whole
                break
            node = node.setdefault(part, {})
        if node is not None:
            node[last] = True
    return tree


def _flatten(prefix: str, value: Any, flat: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, flat)
    else:
        flat[prefix] = value


class _DeclaredView:
    """A read-only view of one part of :class:`Params` that exposes exactly the declared keys below it."""

    __slots__ = ("_value", "_tree", "_prefix", "_stage", "_declared")

    def __init__(self, value: BaseModel, tree: DeclaredTree, prefix: str, stage: str, declared: list[str]) -> None:
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "_tree", tree)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_declared", declared)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        key = f"{self._prefix}{name}"
        branch = self._tree.get(name)
        if branch is None:
            raise ParamsError(
                f"stage '{self._stage}' reads params '{key}' but dvc.yaml does not declare it "
                f"(declared: {self._declared}); add it to the stage's params in dvc.yaml"
            )
        value = getattr(self._value, name)
        if branch is True:
            return value
        return _DeclaredView(value, branch, f"{key}.", self._stage, self._declared)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"params are read-only (tried to set '{self._prefix}{name}')")

    def __repr__(self) -> str:
        return f"<params of stage '{self._stage}' under '{self._prefix or '.'}': {sorted(self._tree)}>"

    def __reduce__(self) -> tuple[Any, ...]:  # __setattr__ refuses, so pickle rebuilds through __init__
        return (_DeclaredView, (self._value, self._tree, self._prefix, self._stage, self._declared))


class StageParams(_DeclaredView):
    """A read-only view of :class:`Params` that exposes exactly the keys a stage declares in ``dvc.yaml``.

    A declared section (``refine``) gives everything under it; a declared key (``refine.threshold_quantile``)
    gives that key alone, so ``params.refine.crf`` then fails. A stage that reads a key DVC does not know
    about would not re-run when that key changes; this view turns such a mistake into an immediate error
    naming the stage and the key.
    """

    __slots__ = ()

    def __init__(self, params: Params, declared: list[str], stage: str) -> None:
        tree = declared_tree(declared)
        super().__init__(params, tree, "", stage, sorted(_declared_names(tree)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (StageParams, (self._value, self._declared, self._stage))

    @property
    def declared(self) -> set[str]:
        """The dotted keys this stage may read (a section declared whole is one name)."""
        return set(self._declared)

    def to_flat_dict(self) -> dict[str, Any]:
        """The declared keys as ``{"a.b.c": value}`` (every leaf under a declared section), for MLflow."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, value: Any, branch: DeclaredTree | bool) -> None:
            if branch is True:
                _flatten(prefix, value, flat)
                return
            for key, inner in branch.items():
                name = f"{prefix}.{key}" if prefix else key
                if not isinstance(value, dict) or key not in value:
                    raise ParamsError(
                        f"dvc.yaml: stage '{self._stage}' declares params '{name}', which params.yaml has no key for"
                    )
                walk(name, value[key], inner)

        walk("", self._value.model_dump(), self._tree)
        return flat


def _declared_names(tree: DeclaredTree, prefix: str = "") -> list[str]:
    names: list[str] = []
    for key, branch in tree.items():
        name = f"{prefix}{key}"
        names.extend([name] if branch is True else _declared_names(branch, f"{name}."))
    return names


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
