"""In-memory tile datasets for both training stages.

Tiles are decoded once into one uint8 array, so the data loader never waits on PNG decoding; augmentation
is the only per-item work.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from weakseg.data.layout import Tile
from weakseg.io import read_mask, read_pseudo_mask, read_rgb
from weakseg.losses.segmentation import IGNORE_INDEX
from weakseg.preprocessing import tile_to_tensor


def load_tiles(folder: str | Path, tiles: Sequence[Tile], description: str = "loading tiles") -> np.ndarray:
    """Decodes ``folder/NAME`` for each tile into one ``(N, H, W, 3)`` uint8 array.

    Raises:
        ImageReadError: naming a missing or corrupt file.
        ValueError: if the tiles differ in size.
    """
    folder = Path(folder)
    images = [read_rgb(folder / tile.name) for tile in tqdm(tiles, desc=description, leave=False)]
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(f"{folder}: tiles differ in size {sorted(shapes)}; training needs one tile size")
    return np.stack(images) if images else np.zeros((0, 0, 0, 3), dtype=np.uint8)


def _check_mask_size(path: Path, mask: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is not None and mask.shape != tuple(size):
        raise ValueError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its tile is {size[1]}x{size[0]}")
    return mask


def load_masks(
    folder: str | Path,
    tiles: Sequence[Tile],
    description: str = "loading masks",
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decodes ``folder/NAME`` masks into one ``(N, H, W)`` boolean array.

    Raises:
        ValueError: naming the first mask that is not ``size`` (height, width), when given.
    """
    folder = Path(folder)
    masks = [
        _check_mask_size(folder / tile.name, read_mask(folder / tile.name), size)
        for tile in tqdm(tiles, desc=description, leave=False)
    ]
    return np.stack(masks) if masks else np.zeros((0, 0, 0), dtype=bool)


def load_pseudo_masks(
    folder: str | Path,
    tiles: Sequence[Tile],
    description: str = "loading pseudo-masks",
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decodes ``folder/NAME`` pseudo-masks into one ``(N, H, W)`` uint8 array of training targets.

    0 is background, 1 foreground and :data:`~weakseg.losses.segmentation.IGNORE_INDEX` (255) the ignored
    band (128 on disk, :func:`weakseg.io.read_pseudo_mask`). A two-label file gives 0/1, the same targets
    as :func:`load_masks`.

    Raises:
        ValueError: naming the first pseudo-mask that is not ``size`` (height, width), when given.
    """
    folder = Path(folder)
    targets = []
    for tile in tqdm(tiles, desc=description, leave=False):
        foreground, ignore = read_pseudo_mask(folder / tile.name)
        target = _check_mask_size(folder / tile.name, foreground.astype(np.uint8), size)
        target[ignore] = IGNORE_INDEX
        targets.append(target)
    return np.stack(targets) if targets else np.zeros((0, 0, 0), dtype=np.uint8)


class TileDataset(Dataset):
    """Tiles with their image labels and, optionally, masks, augmented identically.

    Items are ``(image, label)`` or ``(image, label, mask)``: a normalized float tensor ``(3, H, W)``,
    a float label (1.0 positive), and a float mask ``(1, H, W)`` (0, 1, or 255 where the loss ignores the
    pixel; boolean or uint8 masks are both accepted, and the 255 label moves with the geometric transforms).

    With ``repeats`` above 1 the dataset holds every tile that many times over (item ``i`` is tile
    ``i % len(images)``, augmented afresh each time): an epoch of random crops then draws several per tile.
    ``labels`` is the per-item label array, repeated alike, so a class-balanced sampler sees the repeats.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[bool] | np.ndarray,
        masks: np.ndarray | None = None,
        augmentation: A.Compose | None = None,
        repeats: int = 1,
    ) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        if len(images) != len(labels) or (masks is not None and len(masks) != len(images)):
            raise ValueError(
                f"images ({len(images)}), labels ({len(labels)}) and masks "
                f"({None if masks is None else len(masks)}) must have one entry per tile"
            )
        self.images = images
        self.labels = np.tile(np.asarray(labels, dtype=np.float32), repeats)
        self.masks = masks
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def tile_labels(self) -> np.ndarray:
        """One label per tile (``labels`` without its repeats)."""
        return self.labels[: len(self.images)]

    def set_augmentation_seed(self, seed: int) -> None:
        """Re-seeds the augmentation pipeline (once per epoch, so epochs differ but runs repeat)."""
        if self.augmentation is not None:
            self.augmentation.set_random_seed(seed)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        label = torch.tensor(self.labels[index])
        index = index % len(self.images)
        image = self.images[index]
        mask = None if self.masks is None else self.masks[index].astype(np.uint8)
        if self.augmentation is not None:
            if mask is None:
                image = self.augmentation(image=image)["image"]
            else:
                out = self.augmentation(image=image, mask=mask)
                image, mask = out["image"], out["mask"]
        image_tensor = tile_to_tensor(image)
        if mask is None:
            return image_tensor, label
        mask_tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
        return image_tensor, label, mask_tensor
