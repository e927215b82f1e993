"""Class activation maps of the one-logit classifier, with torchcam.

The classifier has a single logit whose sigmoid is P(positive). The class score of the positive class is
that logit; the class score of the negative class is the negated logit (``log P(neg) - log P(pos)`` up to
a constant), so a negative tile's "ground-truth class" CAM shows what argued against the lesion. Negative
tiles get empty pseudo-masks downstream anyway; their CAMs are kept for inspection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from weakseg.dihedral import DIHEDRAL_VIEWS, dihedral_view, undo_dihedral_view
from weakseg.errors import UserInputError
from weakseg.preprocessing import images_to_tensor

# Names in params.yaml -> torchcam extractor classes (imported lazily: torchcam is only needed here).
CAM_METHODS = ("smoothgradcampp", "gradcam", "gradcampp", "scorecam", "layercam")


class CamMethodError(UserInputError):
    """Raised for an unknown CAM method or target layer."""


def _extractor_class(method: str) -> type:
    from torchcam import methods

    classes = {
        "smoothgradcampp": methods.SmoothGradCAMpp,
        "gradcam": methods.GradCAM,
        "gradcampp": methods.GradCAMpp,
        "scorecam": methods.ScoreCAM,
        "layercam": methods.LayerCAM,
    }
    if method not in classes:
        raise CamMethodError(f"cam.method {method!r} is not a known CAM method; expected one of {CAM_METHODS}")
    return classes[method]


def build_cam_extractor(
    model: nn.Module,
    method: str = "smoothgradcampp",
    target_layer: str = "layer4",
    num_samples: int = 4,
    std: float = 0.3,
    batch_size: int = 16,
) -> Any:
    """A torchcam extractor hooked on ``target_layer`` of ``model``.

    Args:
        model: the classifier (a torchvision ResNet with a one-logit ``fc``).
        method: one of ``CAM_METHODS``.
        target_layer: a module name from ``model.named_modules()`` (ResNet: ``layer4`` is the last stage).
        num_samples: Smooth Grad-CAM++ noise samples (ignored by other methods).
        std: Smooth Grad-CAM++ noise standard deviation, in normalized-input units (ignored by others).
        batch_size: Score-CAM's masked-input batch size (ignored by others).

    Returns:
        The extractor; use it as a context manager so its hooks are removed.

    Raises:
        CamMethodError: for an unknown method or layer name.
    """
    extractor_class = _extractor_class(method)
    layers = dict(model.named_modules())
    if target_layer not in layers or target_layer == "":
        candidates = [name for name, module in layers.items() if name and isinstance(module, nn.Sequential)]
        raise CamMethodError(
            f"cam.target_layer {target_layer!r} is not a layer of the classifier; try one of {candidates}"
        )
    if method == "smoothgradcampp":
        return extractor_class(model, target_layer, num_samples=num_samples, std=std)
    if method == "scorecam":
        return extractor_class(model, target_layer, batch_size=batch_size)
    return extractor_class(model, target_layer)


def class_score_targets(positives: Sequence[bool]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """torchcam output targets: the logit for positive tiles, the negated logit for negative ones."""

    def positive_score(output: torch.Tensor) -> torch.Tensor:
        return output.reshape(-1)[0]

    def negative_score(output: torch.Tensor) -> torch.Tensor:
        return -output.reshape(-1)[0]

    return [positive_score if positive else negative_score for positive in positives]


def images_to_model_input(images: np.ndarray, preprocessing: Mapping[str, Any] | None = None) -> torch.Tensor:
    """uint8 RGB tiles ``(N, H, W, 3)`` to the classifier's input, as the checkpoint's preprocessing says.

    Without a preprocessing record, ImageNet statistics are used (:func:`images_to_tensor`).
    """
    if not preprocessing or "mean" not in preprocessing or "std" not in preprocessing:
        return images_to_tensor(images)
    scale = float(preprocessing.get("scale", 255.0))
    return images_to_tensor(images, preprocessing["mean"], preprocessing["std"], scale)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Scales each ``(H, W)`` map of ``(N, H, W)`` to 0..1 (a flat map becomes all zero)."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1)
    span = high - low
    scaled = torch.where(span > 0, (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))
    return scaled.clamp_(0.0, 1.0)


def compute_cams(
    model: nn.Module,
    images: np.ndarray,
    positives: Sequence[bool],
    method: str = "smoothgradcampp",
    target_layer: str = "layer4",
    num_samples: int = 4,
    std: float = 0.3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    preprocessing: Mapping[str, Any] | None = None,
    score_batch_size: int = 16,
) -> np.ndarray:
    """CAMs of one batch of same-sized tiles for their ground-truth classes, upsampled and scaled to 0..1.

    Args:
        model: the classifier in eval mode.
        images: ``(N, H, W, 3)`` uint8 RGB tiles of one size.
        positives: each tile's label (True = positive class).
        method: one of ``CAM_METHODS``.
        target_layer: module name of the layer whose activations are weighed.
        num_samples: Smooth Grad-CAM++ noise samples.
        std: Smooth Grad-CAM++ noise standard deviation.
        seed: seeds the SmoothGrad noise (drawn from torch's CPU generator), so CAMs are reproducible.
        device: where the model runs.
        preprocessing: the checkpoint's preprocessing record.
        score_batch_size: Score-CAM's masked-input batch size.

    Returns:
        ``(N, H, W)`` float32 maps in 0..1.

    Raises:
        CamMethodError: for an unknown method or layer.
        ValueError: if ``images`` and ``positives`` differ in length.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) RGB tiles, got shape {images.shape}")
    if len(positives) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} tiles but {len(positives)} labels")
    device = torch.device(device)
    model = model.to(device).eval()
    inputs = images_to_model_input(images, preprocessing).to(device)
    targets = class_score_targets(positives)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        # SmoothGradCAMpp draws its noise from the global CPU generator; forking keeps the caller's state.
        torch.manual_seed(seed)
        extractor = build_cam_extractor(model, method, target_layer, num_samples, std, score_batch_size)
        with extractor:
            scores = model(inputs)
            maps = extractor(scores=scores, targets=targets)[0]
    maps = maps.detach().float()
    maps = torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
    upsampled = F.interpolate(maps[:, None], size=images.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    return normalize_maps(upsampled).cpu().numpy().astype(np.float32)


def dihedral_mean(maps_of: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """The mean of ``maps_of`` over the eight rotations and flips of ``images``, scaled to 0..1 per map.

    A CAM is not equivariant: the noise of Smooth Grad-CAM++ and a network's learnt orientation biases make
    each view's map a different estimate of the same evidence, and tissue has no preferred orientation, so
    the mean is a less noisy one.

    Args:
        maps_of: ``(N, H, W, 3)`` images to ``(N, H, W)`` maps (e.g. :func:`compute_cams` on a batch).
        images: ``(N, H, W, 3)`` tiles of one size; a tile that is not square is turned into ``(N, W, H, 3)``
            views, whose maps are turned back.

    Returns:
        ``(N, H, W)`` float32 maps in 0..1.
    """
    images = np.asarray(images)
    total = np.zeros(images.shape[:3], dtype=np.float64)
    for turns, flipped in DIHEDRAL_VIEWS:
        total += undo_dihedral_view(maps_of(dihedral_view(images, turns, flipped)), turns, flipped)
    return normalize_maps(torch.from_numpy(total / len(DIHEDRAL_VIEWS))).numpy().astype(np.float32)


def cam_to_uint8(cam: np.ndarray) -> np.ndarray:
    """A 0..1 map as an 8-bit grey image (0..255), the on-disk form of ``data/cams``."""
    return (np.clip(np.asarray(cam, dtype=np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def cam_from_uint8(pixels: np.ndarray) -> np.ndarray:
    """The inverse of :func:`cam_to_uint8` (up to quantization): float32 in 0..1."""
    return np.asarray(pixels, dtype=np.float32) / 255.0
