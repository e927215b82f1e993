"""What a model sees: uint8 RGB tiles scaled and normalized per channel into a float tensor.

Training, CAM generation and inference all prepare tiles here, so a checkpoint's model gets at inference
the numbers it was trained on: batches with :func:`images_to_tensor`, and the training datasets' augmented
tiles one at a time with :func:`tile_to_tensor`, which computes the same normalization in NumPy (its
float32 results differ from :func:`images_to_tensor`'s in the last bits; both are kept so that every
trained model stays bit-identical to the one trained before the two were brought together).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from weakseg.models import IMAGENET_MEAN, IMAGENET_STD

_IMAGENET_MEAN_255 = np.asarray(IMAGENET_MEAN, dtype=np.float32) * 255.0
_IMAGENET_STD_255 = np.asarray(IMAGENET_STD, dtype=np.float32) * 255.0


def tile_to_tensor(image: np.ndarray) -> torch.Tensor:
    """One uint8 RGB tile ``(H, W, 3)`` to a float32 tensor ``(3, H, W)`` with ImageNet's normalization.

    ``(image - 255 * mean) / (255 * std)`` in NumPy float32, for the training datasets (one augmented tile
    per item); within 1e-6 of :func:`images_to_tensor`.
    """
    normalized = (np.asarray(image, dtype=np.float32) - _IMAGENET_MEAN_255) / _IMAGENET_STD_255
    return torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))


def images_to_tensor(
    images: np.ndarray | Sequence[np.ndarray],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: float = 255.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """uint8 RGB tiles ``(N, H, W, 3)`` (or one ``(H, W, 3)``) to a normalized float tensor ``(N, 3, H, W)``.

    The result is ``(images / scale - mean) / std`` per channel, in float32. On a CUDA ``device`` the uint8
    array crosses first (a quarter of the bytes of float32) and the arithmetic runs there; otherwise the
    tensor stays on the CPU. The result keeps the channels-last memory layout of the input (callers that
    need a contiguous ``(N, 3, H, W)`` tensor call ``.contiguous()``).

    Args:
        images: the tiles, one array or a sequence of equally shaped arrays.
        mean: per-channel mean, in units of ``images / scale`` (ImageNet's by default).
        std: per-channel standard deviation, in the same units.
        scale: what the uint8 values are divided by first.
        device: where the arithmetic runs (only a CUDA device moves the tiles).
    """
    array = images if isinstance(images, np.ndarray) else np.stack(list(images))
    batch = torch.from_numpy(np.ascontiguousarray(array))
    if batch.ndim == 3:
        batch = batch[None]
    if device is not None and device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    batch = batch.permute(0, 3, 1, 2).float().div_(scale)
    mean_values = torch.tensor(list(mean), dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    std_values = torch.tensor(list(std), dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    return batch.sub_(mean_values).div_(std_values)
