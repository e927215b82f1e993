"""The segmenter's data: splits in memory, the epoch's batches (one process or split over ranks), loaders.

Every epoch's tiles come from a pure function of ``(epoch, seed)``
(:func:`weakseg.training.curriculum.epoch_indices`); :func:`training_batches` cuts them into the
one-process run's batches, and under ``torch.distributed`` :func:`distributed_training_batches` splits
each of those batches over the ranks, so step ``s`` of all ranks together is the one-process batch ``s``.
:func:`segmenter_splits` carves the validation split from the train partition and
:func:`load_segmenter_splits` decodes both splits' tiles and training masks from the files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, get_worker_info

from weakseg.data.layout import Tile, partition, split_train_validation
from weakseg.errors import UserInputError
from weakseg.training.common import worker_seed
from weakseg.training.curriculum import shard_indices
from weakseg.training.datasets import TileDataset, load_masks, load_pseudo_masks, load_tiles


@dataclass
class SegmenterData:
    """One split in memory: uint8 tiles ``(N, H, W, 3)``, masks ``(N, H, W)``, tile labels ``(N,)``.

    Masks are boolean, or uint8 with 0 background, 1 foreground and ``IGNORE_INDEX`` (255) for pixels the
    loss and the validation counts skip (the pseudo-masks' uncertain band).
    """

    images: np.ndarray
    masks: np.ndarray
    positives: np.ndarray

    def __post_init__(self) -> None:
        self.positives = np.asarray(self.positives, dtype=bool)
        if not (len(self.images) == len(self.masks) == len(self.positives)):
            raise ValueError(
                f"images ({len(self.images)}), masks ({len(self.masks)}) and labels ({len(self.positives)}) "
                f"must have one entry per tile"
            )
        if len(self.images) and self.images.shape[1:3] != self.masks.shape[1:3]:
            raise ValueError(f"tiles are {self.images.shape[1:3]} but masks are {self.masks.shape[1:3]}")


def _seed_worker_augmentation(worker_id: int) -> None:
    """Gives each loader worker its own augmentation stream, derived from the epoch's seed."""
    info = get_worker_info()
    if info is None:
        return
    dataset = info.dataset
    dataset.set_augmentation_seed(worker_seed(dataset.epoch_seed, worker_id))  # type: ignore[attr-defined]


class EpochSeededDataset(TileDataset):
    """A :class:`TileDataset` that remembers the epoch's augmentation seed for its loader workers."""

    epoch_seed: int = 0

    def start_epoch(self, seed: int) -> None:
        """Re-seeds augmentation for one epoch (in this process and, via the seed, in workers)."""
        self.epoch_seed = seed
        self.set_augmentation_seed(seed)


def training_batches(indices: np.ndarray, batch_size: int) -> list[list[int]]:
    """Splits an epoch's indices into batches, folding a trailing single tile into the previous batch.

    A batch of one cannot train: DeepLabv3+'s image-pooling branch normalises a ``1 x 1`` map with
    BatchNorm, which needs more than one value per channel.
    """
    batches = [indices[start : start + batch_size].tolist() for start in range(0, len(indices), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2].extend(batches.pop())
    if batches and len(batches[-1]) == 1:
        return []
    return batches


def distributed_training_batches(indices: np.ndarray, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches of an epoch: each one-process batch (:func:`training_batches`) split by rank.

    Every rank gets the same number of batches, and step ``s`` of all ranks together is the one-process
    batch ``s``, except that a last batch too small to give each rank a tile is folded into the batch
    before it (a rank without a tile could not take part in the step).

    Args:
        indices: the epoch's tiles in order (:func:`weakseg.training.curriculum.epoch_indices`).
        batch_size: the global batch.
        rank: this process, ``0 .. world_size - 1``.
        world_size: the number of processes.
    """
    batches = training_batches(indices, batch_size)
    while len(batches) > 1 and len(batches[-1]) < world_size:
        batches[-2].extend(batches.pop())
    if batches and len(batches[-1]) < world_size:
        return []  # too few tiles this epoch to give every rank one
    return [shard_indices(np.asarray(batch), rank, world_size).tolist() for batch in batches]


def batch_loader(dataset: TileDataset, batches: Sequence[Sequence[int]], num_workers: int) -> DataLoader:
    """A loader that yields exactly ``batches`` (lists of dataset indices), in order.

    Workers of an :class:`EpochSeededDataset` each draw their own augmentation stream from the epoch's seed;
    a plain :class:`TileDataset` (validation, unaugmented) needs no seeding in its workers.
    """
    seeded = isinstance(dataset, EpochSeededDataset)
    return DataLoader(
        dataset,
        batch_sampler=batches,  # type: ignore[arg-type]  # torch types it Iterable[list]; any index sequences do
        num_workers=num_workers,
        worker_init_fn=_seed_worker_augmentation if num_workers > 0 and seeded else None,
        persistent_workers=False,
    )


class SegmenterInputError(UserInputError):
    """Raised when the segmenter's inputs do not fit together."""


def load_segmenter_split(
    images_folder: Path, masks_folder: Path, tiles: Sequence[Tile], description: str, pseudo_masks: bool
) -> SegmenterData:
    """Decodes ``tiles`` and their training masks: pseudo-masks (with their ignored band) or true masks.

    Raises:
        SegmenterInputError: if a mask's size differs from its tile's, naming the mask file.
    """
    images = load_tiles(images_folder, tiles, f"loading {description} tiles")
    size = (int(images.shape[1]), int(images.shape[2]))
    try:
        if pseudo_masks:
            # 0/1 targets, and 255 where the pseudo-mask's band is ignored (refine.background_quantile).
            masks = load_pseudo_masks(masks_folder, tiles, f"loading {description} pseudo-masks", size)
        else:
            masks = load_masks(masks_folder, tiles, f"loading {description} true masks", size)
    except ValueError as error:
        raise SegmenterInputError(str(error)) from None
    return SegmenterData(images=images, masks=masks, positives=np.array([tile.positive for tile in tiles]))


def segmenter_splits(
    tiles: Sequence[Tile], validation_fraction: float, seed: int, annotations: Path, positive_label: str
) -> tuple[list[Tile], list[Tile]]:
    """The train partition cut into the training and the (stratified, seeded) validation split.

    Raises:
        SegmenterInputError: if the split cannot be made, or the training split has no positive tile;
            ``annotations`` (the file the tiles come from) and ``positive_label`` name the problem.
    """
    try:
        train_tiles, validation_tiles = split_train_validation(partition(tiles, "train"), validation_fraction, seed)
    except ValueError as error:
        raise SegmenterInputError(f"{annotations}: {error} (see split.validation_fraction)") from None
    if not any(tile.positive for tile in train_tiles):
        raise SegmenterInputError(
            f"{annotations}: no {positive_label!r} tile in the training split; "
            f"the segmenter has no pseudo-mask to learn from"
        )
    return train_tiles, validation_tiles


def load_segmenter_splits(
    images_folder: Path,
    masks_folder: Path,
    train_tiles: Sequence[Tile],
    validation_tiles: Sequence[Tile],
    pseudo_masks: bool,
) -> tuple[SegmenterData, SegmenterData, int]:
    """Both splits decoded (:func:`load_segmenter_split`), and their tile size.

    Raises:
        SegmenterInputError: if a mask does not fit its tile, or the two splits' tiles differ in size.
    """
    train = load_segmenter_split(images_folder, masks_folder, train_tiles, "train", pseudo_masks)
    validation = load_segmenter_split(images_folder, masks_folder, validation_tiles, "validation", pseudo_masks)
    if validation.images.shape[1:3] != train.images.shape[1:3]:
        raise SegmenterInputError(
            f"{images_folder}: validation tiles are {validation.images.shape[1:3]}, "
            f"train tiles {train.images.shape[1:3]}; training needs one tile size"
        )
    return train, validation, int(train.images.shape[1])
