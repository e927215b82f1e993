"""Batched inference shared by the ``evaluate`` stage and the ``predict`` command.

Images of any size are cut into windows of the checkpoint's tile size, with overlap; windows of several
images share a batch, so a folder of small tiles runs at the model's batched throughput. Window outputs
are blended back with a smooth weight (a raised-cosine window that never reaches zero), averaging
*logits*, so a model whose output does not depend on the window position gives a seamless map. Images
smaller than a window are padded by reflection and cropped back.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import nn

from weakseg.errors import UserInputError
from weakseg.models import IMAGENET_MEAN, IMAGENET_STD, load_checkpoint, model_from_checkpoint

Key = TypeVar("Key")

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

# Edge weight of the blending window relative to its centre: small, so window borders (where the model
# sees the least context) count little, but above zero, so pixels covered by one window only stay defined.
WINDOW_EDGE_WEIGHT = 0.05


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
    def from_checkpoint(cls, payload: dict[str, Any], source: str = "checkpoint") -> "Preprocessing":
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
            path, key, stage, decisions, default, stage,
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
    """uint8 RGB ``(N, H, W, 3)`` to a normalized float ``(N, 3, H, W)`` tensor on ``device``.

    The uint8 array crosses to the device before conversion (a quarter of the bytes of float32), and the
    result equals ``training.common.images_to_tensor`` for the same statistics.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(batch))
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    tensor = tensor.permute(0, 3, 1, 2).float().div_(preprocessing.scale)
    mean = torch.tensor(preprocessing.mean, dtype=tensor.dtype, device=tensor.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=tensor.dtype, device=tensor.device).view(1, 3, 1, 1)
    return tensor.sub_(mean).div_(std).contiguous()


# A batch forward: normalized images (N, 3, T, T) -> pixel logits (N, T, T) or None, and a mapping of
# tile-level logits (N,) by name (e.g. {"head": ..., "classifier": ...}).
BatchForward = Callable[[torch.Tensor], tuple[torch.Tensor | None, dict[str, torch.Tensor]]]


def make_forward(segmenter: nn.Module | None, classifier: nn.Module | None = None) -> BatchForward:
    """The batch forward of a segmenter (pixel logits and its ``head`` logit) and/or a classifier.

    Raises:
        ValueError: if neither model is given.
    """
    if segmenter is None and classifier is None:
        raise ValueError("make_forward needs a segmenter, a classifier, or both")

    def forward(images: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        pixel_logits: torch.Tensor | None = None
        tile_logits: dict[str, torch.Tensor] = {}
        if segmenter is not None:
            mask_logits, label_logits = segmenter(images)
            pixel_logits = mask_logits[:, 0]
            tile_logits["head"] = label_logits.reshape(-1)
        if classifier is not None:
            tile_logits["classifier"] = classifier(images).reshape(-1)
        return pixel_logits, tile_logits

    return forward


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Start offsets of windows covering ``0..length`` with at least ``overlap`` pixels shared.

    The last window is aligned to the end, so every window lies inside the (padded) image.

    Raises:
        InferenceError: if ``overlap`` is not in ``[0, window)``.
    """
    if not 0 <= overlap < window:
        raise InferenceError(f"overlap must be >= 0 and smaller than the tile size {window}, got {overlap}")
    if length <= window:
        return [0]
    stride = window - overlap
    count = int(np.ceil((length - window) / stride)) + 1
    # Spread the windows evenly rather than leaving a thin last step.
    return [int(round(index * (length - window) / (count - 1))) for index in range(count)]


def blending_window(size: int) -> np.ndarray:
    """A separable raised-cosine weight ``(size, size)``, 1 in the centre and ``WINDOW_EDGE_WEIGHT`` at the edges."""
    if size == 1:
        return np.ones((1, 1), dtype=np.float32)
    profile = 0.5 - 0.5 * np.cos(2.0 * np.pi * (np.arange(size) + 0.5) / size)
    profile = WINDOW_EDGE_WEIGHT + (1.0 - WINDOW_EDGE_WEIGHT) * profile
    return np.outer(profile, profile).astype(np.float32)


def pad_to_window(image: np.ndarray, window: int) -> np.ndarray:
    """Pads an ``(H, W, C)`` image by reflection at the bottom/right so both sides are at least ``window``."""
    height, width = image.shape[:2]
    pad_height, pad_width = max(window - height, 0), max(window - width, 0)
    if pad_height == 0 and pad_width == 0:
        return image
    # numpy's reflect mode repeats the reflection when the pad exceeds the image; a 1-pixel side cannot
    # be reflected, so it is repeated instead.
    mode = "reflect" if min(height, width) > 1 else "edge"
    return np.pad(image, ((0, pad_height), (0, pad_width), (0, 0)), mode=mode)


@dataclass
class ImagePrediction:
    """What inference gives for one image.

    Attributes:
        probability: foreground probability ``(H, W)`` float32 (None without a segmenter).
        tile_probabilities: tile-level probabilities by source (``head``, ``classifier``); for an image
            cut into several windows, the highest window probability (an image is positive if any part is).
        windows: how many windows the image was cut into.
    """

    probability: np.ndarray | None
    tile_probabilities: dict[str, float]
    windows: int


@dataclass
class _PendingImage(Generic[Key]):
    key: Key
    height: int
    width: int
    windows_left: int
    windows: int
    probability: np.ndarray | None = None
    logit_sum: np.ndarray | None = None
    weight_sum: np.ndarray | None = None
    tile_logit_max: dict[str, float] = field(default_factory=dict)


@dataclass
class _LaunchedBatch(Generic[Key]):
    """A batch whose forward pass was queued on the device; its results are read by ``_collect``."""

    places: list[tuple[_PendingImage[Key], int, int]]
    pixels: torch.Tensor | None
    tiles: dict[str, torch.Tensor]
    done: torch.cuda.Event | None


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(values, -80.0, 80.0)))).astype(np.float32)


def _launch(
    windows: list[np.ndarray],
    places: list[tuple[_PendingImage[Key], int, int]],
    forward: BatchForward,
    preprocessing: Preprocessing,
    device: torch.device,
) -> _LaunchedBatch[Key]:
    """Queues one batch: forward pass, and (on CUDA) an asynchronous copy of its outputs to the host."""
    pixel_logits, tile_logits = forward(to_input_tensor(np.stack(windows), preprocessing, device))
    pixels = None
    if pixel_logits is not None:
        # A whole image in one window needs no blending: its probability is computed on the device.
        whole = torch.tensor([state.windows == 1 for state, _, _ in places], device=pixel_logits.device)
        pixels = torch.where(whole[:, None, None], torch.sigmoid(pixel_logits.float()), pixel_logits.float())
    tiles = {name: logits.float() for name, logits in tile_logits.items()}
    done = None
    if device.type == "cuda":
        # Copies into pinned host memory overlap with the next batch's preparation and forward pass.
        pixels = None if pixels is None else pixels.to("cpu", non_blocking=True)
        tiles = {name: values.to("cpu", non_blocking=True) for name, values in tiles.items()}
        done = torch.cuda.Event()
        done.record()
    return _LaunchedBatch(list(places), pixels, tiles, done)


def _collect(batch: _LaunchedBatch[Key], weight: np.ndarray, window: int) -> None:
    """Adds a finished batch's outputs to the images its windows came from."""
    if batch.done is not None:
        batch.done.synchronize()
    pixels = None if batch.pixels is None else batch.pixels.cpu().numpy()
    tiles = {name: values.cpu().numpy() for name, values in batch.tiles.items()}
    for index, (state, top, left) in enumerate(batch.places):
        if pixels is not None:
            if state.windows == 1:
                state.probability = np.ascontiguousarray(pixels[index, : state.height, : state.width])
            else:
                logit_sum, weight_sum = state.logit_sum, state.weight_sum
                if logit_sum is None or weight_sum is None:  # the image's first window: both start together
                    padded_height, padded_width = max(state.height, window), max(state.width, window)
                    logit_sum = state.logit_sum = np.zeros((padded_height, padded_width), dtype=np.float32)
                    weight_sum = state.weight_sum = np.zeros((padded_height, padded_width), dtype=np.float32)
                logit_sum[top : top + window, left : left + window] += weight * pixels[index]
                weight_sum[top : top + window, left : left + window] += weight
        for name, values in tiles.items():
            state.tile_logit_max[name] = max(state.tile_logit_max.get(name, -np.inf), float(values[index]))
        state.windows_left -= 1


def predict_images(
    images: Iterable[tuple[Key, np.ndarray]],
    forward: BatchForward,
    preprocessing: Preprocessing,
    device: torch.device,
    batch_size: int = 16,
    overlap: int = 0,
) -> Iterator[tuple[Key, ImagePrediction]]:
    """Runs ``forward`` over images of any size, batching windows across images, yielding in input order.

    One batch is kept in flight: on CUDA the next batch is prepared and queued while the previous one
    computes and copies back, so the host work hides behind the device's.

    Args:
        images: ``(key, uint8 RGB (H, W, 3))`` pairs; consumed lazily, so a folder streams through.
        forward: see :func:`make_forward`.
        preprocessing: the model's tile size and normalization.
        device: where the model lives.
        batch_size: windows per forward pass.
        overlap: pixels shared by neighbouring windows of a large image.

    Yields:
        ``(key, ImagePrediction)`` for each image, in input order, as soon as all its windows are done.

    Raises:
        InferenceError: on a bad ``batch_size``/``overlap`` or an image that is not ``(H, W, 3)`` uint8.
    """
    if batch_size < 1:
        raise InferenceError(f"batch size must be >= 1, got {batch_size}")
    window = preprocessing.tile_size
    weight = blending_window(window)
    batch_windows: list[np.ndarray] = []
    batch_places: list[tuple[_PendingImage[Key], int, int]] = []
    pending: deque[_PendingImage[Key]] = deque()
    in_flight: deque[_LaunchedBatch[Key]] = deque()

    def launch_and_collect(final: bool) -> None:
        with torch.inference_mode():
            if batch_windows:
                in_flight.append(_launch(batch_windows, batch_places, forward, preprocessing, device))
                batch_windows.clear()
                batch_places.clear()
            while len(in_flight) > (0 if final else 1):
                _collect(in_flight.popleft(), weight, window)

    def finished() -> Iterator[tuple[Key, ImagePrediction]]:
        while pending and pending[0].windows_left == 0:
            state = pending.popleft()
            probability = state.probability
            if probability is None and state.logit_sum is not None and state.weight_sum is not None:
                logits = state.logit_sum / state.weight_sum
                probability = _sigmoid(logits[: state.height, : state.width])
            tile_probabilities = {
                name: float(_sigmoid(np.asarray([value]))[0]) for name, value in state.tile_logit_max.items()
            }
            yield state.key, ImagePrediction(probability, tile_probabilities, state.windows)

    for key, image in images:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise InferenceError(f"{key}: expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        padded = pad_to_window(image, window)
        tops = window_starts(padded.shape[0], window, overlap)
        lefts = window_starts(padded.shape[1], window, overlap)
        state = _PendingImage(key, height, width, windows_left=len(tops) * len(lefts), windows=len(tops) * len(lefts))
        pending.append(state)
        for top in tops:
            for left in lefts:
                batch_windows.append(padded[top : top + window, left : left + window])
                batch_places.append((state, top, left))
                if len(batch_windows) == batch_size:
                    launch_and_collect(final=False)
                    yield from finished()
    launch_and_collect(final=True)
    yield from finished()


def predict_batch(
    images: Sequence[np.ndarray] | np.ndarray,
    forward: BatchForward,
    preprocessing: Preprocessing,
    device: torch.device,
    batch_size: int = 16,
    overlap: int = 0,
) -> list[ImagePrediction]:
    """:func:`predict_images` over an in-memory list, returning predictions in the same order."""
    return [prediction for _, prediction in predict_images(enumerate(images), forward, preprocessing, device, batch_size, overlap)]
