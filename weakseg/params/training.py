"""The ``classifier`` and ``segmenter`` sections of ``params.yaml`` (the two trained models)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from weakseg.params.base import _key_error, _Strict

# ---------------------------------------------------------------------------------------- classifier
ResNetName = Literal["resnet18", "resnet34", "resnet50", "resnet101"]


class FocalTverskyParams(_Strict):
    """Focal Tversky loss: alpha weighs false negatives, beta false positives."""

    alpha: float = Field(0.7, ge=0.0, le=1.0)
    beta: float = Field(0.3, ge=0.0, le=1.0)
    gamma: float = Field(1.33, gt=0.0)


class UnfreezeParams(_Strict):
    """Progressive unfreezing of a pretrained backbone (``weakseg.training.unfreezing.trainable_groups``).

    Epochs are counted from 0; ``full_epoch`` must lie before the last epoch (``ClassifierParams`` checks it),
    or the last step (``layer1`` and the stem) never trains.
    """

    frozen_epochs: int = Field(5, ge=0, description="Epochs with only the head training.")
    full_epoch: int = Field(25, ge=0, description="Epoch (from 0) from which every layer trains.")
    enabled: bool = Field(False, description="Off by default: it only helps a pretrained backbone.")

    @model_validator(mode="after")
    def _ordered(self) -> UnfreezeParams:
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
    decision_rule: Literal["auto", "balanced_accuracy"] = Field(
        "balanced_accuracy",
        description="How the tile decision threshold is chosen on the validation split: 'balanced_accuracy', "
        "the cut of highest balanced accuracy; 'auto', the same unless one class has fewer than 10 validation "
        "tiles, where the other class places it (scarce negatives: the lowest validation positive's score; "
        "scarce positives: just above the highest validation negative's).",
    )
    crop_size: int | None = Field(
        None,
        ge=16,
        description="Train on random square crops of this many pixels, each with its tile's label (a small field "
        "of view: many varied examples per tile for a model learning from scratch); validation, the decision "
        "threshold, CAMs and every later use see whole tiles. null: whole tiles (the paper).",
    )
    crops_per_tile: int = Field(
        1, ge=1, description="Crops drawn from each train tile per epoch (with crop_size; 1 otherwise)."
    )
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
    def _some_loss(self) -> ClassifierParams:
        if self.bce_weight == 0 and self.focal_tversky_weight == 0:
            raise ValueError("bce_weight and focal_tversky_weight cannot both be 0")
        return self

    @model_validator(mode="after")
    def _crops_need_a_size(self) -> ClassifierParams:
        if self.crops_per_tile > 1 and self.crop_size is None:
            raise _key_error(
                "ClassifierParams",
                ("crops_per_tile",),
                self.crops_per_tile,
                "needs classifier.crop_size: several draws of a whole tile are the same tile",
            )
        return self

    @model_validator(mode="after")
    def _unfreeze_within_epochs(self) -> ClassifierParams:
        if self.unfreeze.enabled and self.unfreeze.full_epoch >= self.epochs:
            raise _key_error(
                "ClassifierParams",
                ("unfreeze", "full_epoch"),
                self.unfreeze.full_epoch,
                f"must be < classifier.epochs ({self.epochs}): epochs run 0..{self.epochs - 1}, and layer1 and "
                "the stem only train from full_epoch on",
            )
        return self


# ---------------------------------------------------------------------------------------- segmenter
class SegmenterLossParams(_Strict):
    """Weights of the segmenter's loss terms."""

    dice: float = Field(1.0, ge=0.0)
    lovasz: float = Field(0.5, ge=0.0)
    classification: float = Field(0.2, ge=0.0)
    multiple_instance: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the multiple-instance term: BCE of each tile's top-fraction pooled "
        "logit against its label (0: off).",
    )
    multiple_instance_top_fraction: float = Field(0.2, gt=0.0, le=1.0)
    size: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the size constraint: a positive tile's predicted foreground "
        "fraction of its not-background pixels is kept in [size_lower, size_upper] (0: off).",
    )
    size_lower: float = Field(0.0, ge=0.0, le=1.0)
    size_upper: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _size_bounds_in_order(self) -> SegmenterLossParams:
        if self.size_lower > self.size_upper:
            raise _key_error(
                "SegmenterLossParams",
                ("size_lower",),
                self.size_lower,
                f"must be <= segmenter.loss.size_upper ({self.size_upper})",
            )
        return self


class CurriculumParams(_Strict):
    """Positive tiles first, then negatives at a rising probability."""

    positive_only_epochs: int = Field(10, ge=0)
    start_negative_probability: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Where the linear ramp to final_negative_probability starts (at epoch "
        "positive_only_epochs); start = final = 1 trains on every tile in every epoch.",
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
        "iou",
        description="The validation score that picks the best epoch: pooled IoU against the validation "
        "targets, or the validation loss (for targets with no foreground pixel).",
    )
    decision_rule: Literal["auto", "balanced_accuracy"] = Field(
        "balanced_accuracy",
        description="How the head's tile decision threshold is chosen on the validation split (the rules of "
        "classifier.decision_rule).",
    )
    num_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = Field(False, description="bf16 autocast (CUDA, or a CPU with native bf16).")
    distributed: DistributedParams = DistributedParams()
