"""The eight rotations and flips of a square grid, for test-time augmentation.

Tissue has no preferred orientation, so a tile's eight dihedral views are eight equally valid inputs; a
model's outputs on them, each turned back, are eight estimates of the same map. Arrays here are numpy
``(N, H, W, ...)`` images (the CAM path) and torch ``(N, C, H, W)`` batches (the inference path); maps
come back as ``(N, H, W)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# The eight symmetries of a square grid: quarter turns, each with and without a left-right flip.
DIHEDRAL_VIEWS = tuple((turns, flipped) for turns in range(4) for flipped in (False, True))
IDENTITY_VIEW = (0, False)


def dihedral_view(images: np.ndarray, turns: int, flipped: bool) -> np.ndarray:
    """``(N, H, W, ...)`` images turned ``turns`` quarter turns, then flipped left-right if ``flipped``."""
    view = np.rot90(images, turns, axes=(1, 2))
    return np.ascontiguousarray(view[:, :, ::-1] if flipped else view)


def undo_dihedral_view(maps: np.ndarray, turns: int, flipped: bool) -> np.ndarray:
    """``(N, h, w)`` maps of a :func:`dihedral_view` brought back to the original orientation."""
    maps = maps[:, :, ::-1] if flipped else maps
    return np.ascontiguousarray(np.rot90(maps, -turns, axes=(1, 2)))


def dihedral_view_tensor(images: torch.Tensor, turns: int, flipped: bool) -> torch.Tensor:
    """:func:`dihedral_view` of a channels-first ``(N, C, H, W)`` tensor."""
    view = torch.rot90(images, turns, dims=(2, 3))
    return view.flip(3) if flipped else view


def undo_dihedral_view_tensor(maps: torch.Tensor, turns: int, flipped: bool) -> torch.Tensor:
    """:func:`undo_dihedral_view` of an ``(N, h, w)`` tensor."""
    maps = maps.flip(2) if flipped else maps
    return torch.rot90(maps, -turns, dims=(1, 2))


def dihedral_mean_tensor(maps_of: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """The mean of ``maps_of`` over the eight views of ``(N, C, H, W)`` ``images``, each turned back.

    ``maps_of`` is called once per view, in the order of :data:`DIHEDRAL_VIEWS`.

    Args:
        maps_of: ``(N, C, H, W)`` batches to ``(N, H, W)`` maps (e.g. a segmenter's pixel logits).
        images: a batch of one size; an oblong batch gives ``(N, C, W, H)`` views, whose maps are turned back.

    Returns:
        ``(N, H, W)`` maps, float32.
    """
    views = [
        undo_dihedral_view_tensor(maps_of(dihedral_view_tensor(images, turns, flipped)), turns, flipped).float()
        for turns, flipped in DIHEDRAL_VIEWS
    ]
    return torch.stack(views).mean(0)
