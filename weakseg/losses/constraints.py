"""Losses that train a segmenter from tile labels: multiple-instance pooling and a size constraint.

A tile label says something about a *set* of pixels, not about each one: a negative tile holds no lesion
pixel, a positive tile holds at least some. Two terms turn that into a gradient on the pixel map, in the
spirit of Kervadec et al. 2019 ("Constrained-CNN losses for weakly supervised segmentation") and Jia et
al. 2017 ("Constrained deep weak supervision for histopathology image segmentation"):

- :func:`multiple_instance_loss`: the mean of the ``top_fraction`` highest pixel logits of each tile's
  region is the tile's logit, scored by BCE against its label. A negative tile pushes its most confident
  pixels down; a positive tile pushes its most lesion-like pixels up, whichever they are.
- :func:`size_constraint_loss`: on positive tiles, the predicted foreground fraction of the region (the
  soft size, the mean foreground probability) is kept inside loose bounds ``[lower, upper]`` by a squared
  hinge, zero inside the bounds. Without it a positive tile could satisfy the pooling term with a few pixels.

The region is where a tile's label speaks: its tissue (pixels outside it are background on every tile).
Both functions take logits and boolean regions and return float32 scalars; tiles whose region is empty
take no part.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_shapes(logits: torch.Tensor, region: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    logits = logits.float().reshape(logits.shape[0], -1)
    region = region.reshape(region.shape[0], -1).bool()
    labels = labels.float().reshape(-1)
    if logits.shape != region.shape or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"logits {tuple(logits.shape)}, region {tuple(region.shape)} and labels {tuple(labels.shape)} "
            "must describe the same tiles and pixels"
        )
    return logits, region, labels


def top_fraction_pool(logits: torch.Tensor, region: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """Each tile's mean of the ``ceil(top_fraction * |region|)`` highest logits inside its region.

    Args:
        logits: ``(N, ...)`` pixel logits.
        region: boolean, the shape of ``logits``; pixels outside it are never pooled.
        top_fraction: in ``(0, 1]``; 1 is the region's mean logit.

    Returns:
        ``(N,)`` pooled logits; NaN for a tile whose region is empty.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    flat = logits.float().reshape(logits.shape[0], -1)
    inside = region.reshape(region.shape[0], -1).bool()
    counts = inside.sum(dim=1)
    # Pixels outside the region sort last; each tile then averages its own first k.
    ordered = torch.where(inside, flat, torch.full_like(flat, -math.inf)).sort(dim=1, descending=True).values
    k = torch.clamp(torch.ceil(counts.float() * top_fraction).long(), min=1)
    rank = torch.arange(flat.shape[1], device=flat.device).unsqueeze(0)
    chosen = rank < k.unsqueeze(1)
    pooled = torch.where(chosen, ordered, torch.zeros_like(ordered)).sum(dim=1) / k.float()
    return torch.where(counts > 0, pooled, torch.full_like(pooled, math.nan))


def multiple_instance_loss(
    logits: torch.Tensor, region: torch.Tensor, labels: torch.Tensor, top_fraction: float
) -> torch.Tensor:
    """BCE of each tile's top-fraction pooled logit (:func:`top_fraction_pool`) against its label.

    Args:
        logits: ``(N, 1, H, W)`` or ``(N, H, W)`` pixel logits.
        region: boolean, the same shape: the pixels the label speaks about (the tissue).
        labels: ``(N,)`` tile labels in {0, 1}.
        top_fraction: the share of each region's pixels that is pooled.

    Returns:
        The mean over tiles with a non-empty region; 0 (with a gradient of 0) when there is none.
    """
    logits, region, labels = _check_shapes(logits, region, labels)
    pooled = top_fraction_pool(logits, region, top_fraction)
    used = ~torch.isnan(pooled)
    if not bool(used.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(pooled[used], labels[used])


def soft_size(logits: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``(N,)`` mean foreground probability inside each tile's region (NaN where the region is empty)."""
    flat = torch.sigmoid(logits.float().reshape(logits.shape[0], -1))
    inside = region.reshape(region.shape[0], -1).float()
    counts = inside.sum(dim=1)
    size = (flat * inside).sum(dim=1) / counts.clamp(min=1.0)
    return torch.where(counts > 0, size, torch.full_like(size, math.nan))


def size_constraint_loss(
    logits: torch.Tensor, region: torch.Tensor, labels: torch.Tensor, lower: float, upper: float
) -> torch.Tensor:
    """Squared hinge keeping each positive tile's soft size (:func:`soft_size`) inside ``[lower, upper]``.

    ``relu(lower - size)^2 + relu(size - upper)^2``, averaged over positive tiles with a non-empty region;
    negative tiles take no part (their pixels are background targets already).

    Args:
        logits: ``(N, 1, H, W)`` or ``(N, H, W)`` pixel logits.
        region: boolean, the same shape (the tissue).
        labels: ``(N,)`` tile labels in {0, 1}.
        lower: the smallest foreground fraction of a positive tile's region, in ``[0, 1]``.
        upper: the largest, in ``[lower, 1]``.

    Returns:
        A float32 scalar; 0 (with a gradient of 0) when the batch has no positive tile with a region.
    """
    if not 0.0 <= lower <= upper <= 1.0:
        raise ValueError(f"size bounds must satisfy 0 <= lower <= upper <= 1, got [{lower}, {upper}]")
    logits, region, labels = _check_shapes(logits, region, labels)
    size = soft_size(logits, region)
    used = (labels > 0.5) & ~torch.isnan(size)
    if not bool(used.any()):
        return logits.sum() * 0.0
    size = size[used]
    return (F.relu(lower - size) ** 2 + F.relu(size - upper) ** 2).mean()
