"""The ``evaluate`` section of ``params.yaml``: scoring on the test partition."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from weakseg.params.base import _Strict


class EvaluateParams(_Strict):
    """Scoring on the test partition."""

    threshold: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="The segmenter's pixel threshold. Classifier decisions (scores, confusion, every gate) use "
        "the decision_threshold train_classifier chose on validation and stored in its checkpoint.",
    )
    segmenter_gate: Literal["none", "classifier", "head", "classifier_and_head"] = Field(
        "none",
        description="'classifier': the segmenter's mask of a tile the classifier calls negative is emptied "
        "(a classification gate at inference; weakseg-predict --gate --classifier does the same); 'head': of "
        "a tile the segmenter's own classification head calls negative, at the threshold train_segmenter "
        "chose on validation (weakseg-predict --gate); 'classifier_and_head': of a tile whose lower probability "
        "of the two is below a cut evaluate chooses on the validation split of train by "
        "classifier.decision_rule and writes to metrics/evaluate.json as classifier_and_head.threshold "
        "(weakseg-predict --gate --classifier --classifier-and-head-threshold).",
    )
    test_time_augmentation: Literal["none", "dihedral"] = Field(
        "none",
        description="'dihedral': the segmenter's pixel logits are the mean over each tile's eight rotations "
        "and flips, each turned back (8x the segmenter's time at test); tile decisions stay those of the tile "
        "as it is, whose thresholds were chosen on validation. weakseg-predict --test-time-augmentation.",
    )
    fill_holes: bool = Field(
        False,
        description="True: after the threshold and refine.restrict_to_tissue, every region a tile's mask "
        "encloses is added to it (gland lumens inside a lesion, which region outlines include; "
        "weakseg-predict --fill-holes does the same). The paper's chain has no such step.",
    )
    min_foreground_pixels: int = Field(64, ge=0, description="Tile positive if the prediction has more.")
    figure_tiles: int = Field(4, ge=1, le=32, description="Test tiles per class in the figures.")
    figure_seed: int = Field(0, ge=0)
    batch_size: int = Field(16, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
