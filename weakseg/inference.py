"""Trained models for inference, shared by the ``evaluate`` stage and the ``predict`` command.

A checkpoint loads with the preprocessing its model was trained with (:class:`Preprocessing`) and its
stored tile thresholds; :func:`make_forward` turns a segmenter and/or a classifier into one batch forward,
which :mod:`weakseg.sliding_window` runs over images of any size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from weakseg.dihedral import DIHEDRAL_VIEWS, IDENTITY_VIEW, dihedral_mean_tensor
from weakseg.errors import UserInputError
from weakseg.models import IMAGENET_MEAN, IMAGENET_STD, load_checkpoint, model_from_checkpoint
from weakseg.preprocessing import images_to_tensor

LOGGER = logging.getLogger(__name__)
# The segmenter head's tile threshold of checkpoints written before train_segmenter chose one on validation.
DEFAULT_HEAD_THRESHOLD = 0.5
# The classifier's tile threshold of checkpoints written before train_classifier chose one on validation.
DEFAULT_DECISION_THRESHOLD = 0.5
# Each kind's stored tile threshold: its checkpoint key, the stage that chooses it, what it decides, and the
# value of checkpoints from before it was stored.
STORED_THRESHOLDS: dict[str, tuple[str, str, str, float]] = {
    "segmenter": ("head_threshold", "train_segmenter", "the head's tile decisions", DEFAULT_HEAD_THRESHOLD),
    "classifier": ("decision_threshold", "train_classifier", "its tile decisions", DEFAULT_DECISION_THRESHOLD),
}


class InferenceError(UserInputError):
    """Raised when an inference option or an input image cannot be used."""


@dataclass(frozen=True)
class Preprocessing:
    """How a checkpoint's model expects its input: tile size and per-channel normalization."""

    tile_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    scale: float = 255.0

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any], source: str = "checkpoint") -> Preprocessing:
        """Reads the ``preprocessing`` record that ``training.common.preprocessing_record`` wrote.

        Raises:
            InferenceError: naming ``source`` if the record is missing or has no usable tile size.
        """
        record = payload.get("preprocessing")
        if not isinstance(record, dict) or not isinstance(record.get("tile_size"), int) or record["tile_size"] < 1:
            raise InferenceError(f"{source}: checkpoint has no preprocessing record with a tile_size")
        return cls(
            tile_size=int(record["tile_size"]),
            mean=tuple(float(value) for value in record.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
            std=tuple(float(value) for value in record.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
            scale=float(record.get("scale", 255.0)),
        )


@dataclass
class LoadedModel:
    """A model in eval mode on its device, with its checkpoint's metadata."""

    model: nn.Module
    preprocessing: Preprocessing
    payload: dict[str, Any]
    path: Path

    @property
    def positive_label(self) -> str | None:
        """The positive class the model was trained for, if the checkpoint says."""
        value = self.payload.get("positive_label")
        return str(value) if value is not None else None

    @property
    def negative_label(self) -> str | None:
        """The negative class name recorded in the checkpoint, if any."""
        value = self.payload.get("negative_label")
        return str(value) if value is not None else None

    @property
    def head_threshold(self) -> float:
        """A segmenter's tile threshold for its head's probability, chosen on validation by train_segmenter.

        0.5 for a checkpoint that predates the choice (:func:`load_model` warns when it loads one).
        """
        return float(self.payload.get("head_threshold", DEFAULT_HEAD_THRESHOLD))

    @property
    def decision_threshold(self) -> float:
        """A classifier's tile threshold for its probability, chosen on validation by train_classifier.

        0.5 for a checkpoint that predates the choice (:func:`load_model` warns when it loads one).
        """
        return float(self.payload.get("decision_threshold", DEFAULT_DECISION_THRESHOLD))


def _check_stored_threshold(path: Path, kind: str, payload: dict[str, Any]) -> None:
    """Warns about a missing tile threshold of a ``kind`` checkpoint, and refuses one outside (0, 1)."""
    if kind not in STORED_THRESHOLDS:
        return
    key, stage, decisions, default = STORED_THRESHOLDS[kind]
    threshold = payload.get(key)
    if threshold is None:
        LOGGER.warning(
            "%s: no %s (a checkpoint from before %s chose it on validation); %s use %.1f. "
            "Re-run %s for a calibrated one",
            path,
            key,
            stage,
            decisions,
            default,
            stage,
        )
    elif isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise InferenceError(f"{path}: {key} must be a number between 0 and 1, got {threshold!r}")


def load_model(path: str | Path, kind: str, device: torch.device) -> LoadedModel:
    """Loads a checkpoint of ``kind`` ('classifier' or 'segmenter') onto ``device`` in eval mode.

    A segmenter checkpoint without ``head_threshold`` (written before ``train_segmenter`` chose one), or a
    classifier checkpoint without ``decision_threshold`` (before ``train_classifier`` chose one), loads
    with the 0.5 of that time and a warning naming the file: only the tile decisions depend on it.

    Raises:
        CheckpointError: naming the file if it is missing, unreadable or of another kind.
        InferenceError: naming the file if it has no preprocessing record, or a stored tile threshold
            outside (0, 1).
    """
    path = Path(path)
    payload = load_checkpoint(path, kind=kind)
    preprocessing = Preprocessing.from_checkpoint(payload, str(path))
    _check_stored_threshold(path, kind, payload)
    model = model_from_checkpoint(payload).to(device)
    model.eval()
    return LoadedModel(model=model, preprocessing=preprocessing, payload=payload, path=path)


def to_input_tensor(batch: np.ndarray, preprocessing: Preprocessing, device: torch.device) -> torch.Tensor:
    """uint8 RGB ``(N, H, W, 3)`` to a normalized, contiguous float ``(N, 3, H, W)`` tensor on ``device``.

    :func:`weakseg.preprocessing.images_to_tensor` with the checkpoint's statistics (on CUDA the uint8
    array crosses to the device before conversion, a quarter of the bytes of float32).
    """
    return images_to_tensor(batch, preprocessing.mean, preprocessing.std, preprocessing.scale, device).contiguous()


# A batch forward: normalized images (N, 3, T, T) -> pixel logits (N, T, T) or None, and a mapping of
# tile-level logits (N,) by name (e.g. {"head": ..., "classifier": ...}).
BatchForward = Callable[[torch.Tensor], tuple[torch.Tensor | None, dict[str, torch.Tensor]]]


TEST_TIME_AUGMENTATIONS = ("none", "dihedral")


def make_forward(
    segmenter: nn.Module | None, classifier: nn.Module | None = None, test_time_augmentation: str = "none"
) -> BatchForward:
    """The batch forward of a segmenter (pixel logits and its ``head`` logit) and/or a classifier.

    Args:
        segmenter: a :class:`weakseg.models.Segmenter`, or None.
        classifier: a one-logit tile classifier, or None.
        test_time_augmentation: ``"dihedral"``: the segmenter's pixel logits are the mean over the window's
            eight rotations and flips, each turned back. Tile logits (the head's, the classifier's) stay those
            of the window as it is: their decision thresholds were chosen on validation without augmentation.

    Raises:
        ValueError: if neither model is given.
        InferenceError: for an unknown ``test_time_augmentation``.
    """
    if segmenter is None and classifier is None:
        raise ValueError("make_forward needs a segmenter, a classifier, or both")
    if test_time_augmentation not in TEST_TIME_AUGMENTATIONS:
        raise InferenceError(
            f"test_time_augmentation must be one of {', '.join(TEST_TIME_AUGMENTATIONS)}, "
            f"got {test_time_augmentation!r}"
        )

    def forward(images: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        pixel_logits: torch.Tensor | None = None
        tile_logits: dict[str, torch.Tensor] = {}
        if segmenter is not None and test_time_augmentation == "dihedral":
            head_logits: list[torch.Tensor] = []

            def view_pixel_logits(views: torch.Tensor) -> torch.Tensor:
                mask_logits, label_logits = segmenter(views)
                head_logits.append(label_logits.reshape(-1))
                return mask_logits[:, 0]

            pixel_logits = dihedral_mean_tensor(view_pixel_logits, images)
            tile_logits["head"] = head_logits[DIHEDRAL_VIEWS.index(IDENTITY_VIEW)]
        elif segmenter is not None:
            mask_logits, label_logits = segmenter(images)
            pixel_logits = mask_logits[:, 0]
            tile_logits["head"] = label_logits.reshape(-1)
        if classifier is not None:
            tile_logits["classifier"] = classifier(images).reshape(-1)
        return pixel_logits, tile_logits

    return forward
