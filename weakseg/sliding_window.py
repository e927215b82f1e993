"""Batched inference over images of any size, for the ``evaluate`` stage and the ``predict`` command.

Images of any size are cut into windows of the checkpoint's tile size, with overlap; windows of several
images share a batch, so a folder of small tiles runs at the model's batched throughput. Window outputs
are blended back with a smooth weight (a raised-cosine window that never reaches zero), averaging
*logits*, so a model whose output does not depend on the window position gives a seamless map. Images
smaller than a window are padded by reflection and cropped back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import numpy as np
import torch

from weakseg.inference import BatchForward, InferenceError, Preprocessing, to_input_tensor

Key = TypeVar("Key")

# Edge weight of the blending window relative to its centre: small, so window borders (where the model
# sees the least context) count little, but above zero, so pixels covered by one window only stay defined.
WINDOW_EDGE_WEIGHT = 0.05


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
    mode: Literal["reflect", "edge"] = "reflect" if min(height, width) > 1 else "edge"
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
    return [
        prediction
        for _, prediction in predict_images(enumerate(images), forward, preprocessing, device, batch_size, overlap)
    ]
