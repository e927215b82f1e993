"""The classifier's data: its datasets from the tile files, the seeded order of each training epoch, and
ordered evaluation.

Epoch ``e`` re-seeds the augmentation with ``seed + e`` and draws its order from a generator seeded with
``seed + e``, so a run repeats exactly; loader workers derive their own seeds from it.
``classifier.balance: sampler`` makes each epoch a seeded class-balanced draw (:func:`class_balanced_order`).
Under ``torch.distributed`` each rank gets its strided share of the one-process order, so every global batch
is the one-process batch (:class:`SameOrderDistributedSampler`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler, get_worker_info

from weakseg.data.layout import LayoutError, Tile
from weakseg.distributed import (
    DistributedContext,
    SameOrderDistributedSampler,
    pad_to_multiple,
    per_process_batch_size,
    shard,
)
from weakseg.params import AugmentParams
from weakseg.training.augment import build_augmentation
from weakseg.training.common import worker_seed
from weakseg.training.datasets import TileDataset, load_tiles


def _seed_worker(worker_id: int, base_seed: int) -> None:
    """Gives each loader worker its own augmentation stream, derived from the epoch's seed."""
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, TileDataset):
        info.dataset.set_augmentation_seed(worker_seed(base_seed, worker_id))
    np.random.seed(worker_seed(base_seed, worker_id))
    torch.manual_seed(worker_seed(base_seed, worker_id))


def train_drops_last(dataset_size: int, batch_size: int) -> bool:
    """Whether training drops the last incomplete batch.

    It does whenever there is at least one full batch: a last batch of one tile would break batch norm,
    and shuffling puts every tile in a full batch over the epochs.
    """
    return dataset_size >= batch_size


def steps_per_epoch(dataset_size: int, batch_size: int) -> int:
    """Optimizer steps in one training epoch."""
    if dataset_size <= 0:
        raise ValueError("the training set is empty")
    return dataset_size // batch_size if train_drops_last(dataset_size, batch_size) else 1


def class_balanced_order(labels: np.ndarray | list[bool], seed: int, epoch: int) -> list[int]:
    """The tile order of one ``classifier.balance: sampler`` epoch: a class-balanced draw with replacement.

    As many tiles as ``labels`` holds are drawn, each class with total probability one half (each tile
    with ``1 / (2 * its class size)``), by a ``WeightedRandomSampler`` whose generator is seeded with
    ``seed + epoch``: the same seed and epoch give the same order, another epoch another one. With one
    class only, the draw is uniform.

    Raises:
        ValueError: if ``labels`` is empty.
    """
    labels_array = np.asarray(labels, dtype=bool).reshape(-1)
    if labels_array.size == 0:
        raise ValueError("the training set is empty")
    positives = int(labels_array.sum())
    negatives = int(labels_array.size - positives)
    weights = np.where(labels_array, 1.0 / max(positives, 1), 1.0 / max(negatives, 1))
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    sampler = WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.float64),  # type: ignore[arg-type]  # torch's stub: Sequence[float]
        int(labels_array.size),
        replacement=True,
        generator=generator,
    )
    return [int(index) for index in sampler]


def build_train_loader(
    dataset: TileDataset,
    batch_size: int,
    seed: int,
    epoch: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    context: DistributedContext | None = None,
    balanced: bool = False,
) -> DataLoader:
    """The shuffled, augmented loader of one training epoch (of this rank, when distributed).

    The augmentation is re-seeded with ``seed + epoch`` and the order comes from a generator seeded with
    ``seed + epoch``; workers derive their own seeds from it. With ``balanced``, the order is
    :func:`class_balanced_order` of the dataset's labels (as many tiles, so as many steps, as a shuffled
    epoch). Under a distributed ``context``, ``batch_size`` is still the global batch: each rank gets its
    strided share of the one-process order (:class:`SameOrderDistributedSampler`, or the same cut of the
    balanced draw), in batches of ``batch_size / world_size``, and each rank augments with its own stream
    (derived from the epoch's seed and the rank).
    """
    epoch_seed = seed + epoch
    if context is not None and context.enabled:
        return _distributed_train_loader(dataset, batch_size, seed, epoch, num_workers, pin_memory, context, balanced)
    dataset.set_augmentation_seed(epoch_seed)
    if balanced:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=class_balanced_order(dataset.labels > 0.5, seed, epoch),
            drop_last=train_drops_last(len(dataset), batch_size),
            num_workers=num_workers,
            pin_memory=pin_memory,
            worker_init_fn=functools.partial(_seed_worker, base_seed=epoch_seed) if num_workers > 0 else None,
            persistent_workers=False,
        )
    generator = torch.Generator()
    generator.manual_seed(epoch_seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=train_drops_last(len(dataset), batch_size),
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
        worker_init_fn=functools.partial(_seed_worker, base_seed=epoch_seed) if num_workers > 0 else None,
        persistent_workers=False,
    )


def _distributed_train_loader(
    dataset: TileDataset,
    batch_size: int,
    seed: int,
    epoch: int,
    num_workers: int,
    pin_memory: bool,
    context: DistributedContext,
    balanced: bool = False,
) -> DataLoader:
    """This rank's loader of one epoch: see :func:`build_train_loader`."""
    # Ranks must not share one augmentation stream, or tiles at the same place of each rank's batch would
    # be flipped and jittered alike.
    rank_seed = worker_seed(seed + epoch, 1_000 + context.rank)
    dataset.set_augmentation_seed(rank_seed)
    drop_last = train_drops_last(len(dataset), batch_size)
    sampler: SameOrderDistributedSampler | list[int]
    if balanced:
        order = class_balanced_order(dataset.labels > 0.5, seed, epoch)
        sampler = shard(whole_global_batches(order, batch_size, drop_last, context), context)
    else:
        sampler = SameOrderDistributedSampler(len(dataset), batch_size, drop_last, context, seed)
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=per_process_batch_size(batch_size, context.world_size, "classifier.batch_size"),
        sampler=sampler,
        drop_last=False,  # the sampler already cut the order to whole global batches
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(_seed_worker, base_seed=rank_seed) if num_workers > 0 else None,
        persistent_workers=False,
    )


def whole_global_batches(
    order: list[int], global_batch_size: int, drop_last: bool, context: DistributedContext
) -> list[int]:
    """An epoch's order cut to whole global batches (``drop_last``) or padded to a multiple of the ranks.

    What :class:`SameOrderDistributedSampler` does to a shuffled order, so that every rank's strided
    share (:func:`shard`) has the same number of steps and step ``s`` of all ranks is batch ``s``.
    """
    if drop_last:
        return order[: len(order) // global_batch_size * global_batch_size]
    return pad_to_multiple(order, context.world_size)


def build_eval_loader(
    dataset: TileDataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """An ordered loader without augmentation (the dataset should have none)."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers, pin_memory=pin_memory
    )


def load_classifier_datasets(
    images_folder: Path,
    train_tiles: Sequence[Tile],
    validation_tiles: Sequence[Tile],
    augment: AugmentParams,
    seed: int,
    crop_size: int | None = None,
    crops_per_tile: int = 1,
) -> tuple[TileDataset, TileDataset, int]:
    """Decodes the split's tiles: the augmented training set, the validation set, and their tile size.

    Only these tiles are decoded (the stage never passes a test-partition tile). With ``crop_size`` the
    training set yields ``crops_per_tile`` random crops of that size per tile and epoch; validation keeps
    whole tiles.

    Raises:
        LayoutError: if the train and validation tiles differ in size, the tiles are not square, or
            ``crop_size`` is larger than a tile.
    """
    train_images = load_tiles(images_folder, train_tiles, "loading train tiles")
    validation_images = load_tiles(images_folder, validation_tiles, "loading validation tiles")
    if train_images.shape[1:] != validation_images.shape[1:]:
        raise LayoutError(
            f"{images_folder}: train tiles are {train_images.shape[1:3]} and validation tiles "
            f"{validation_images.shape[1:3]}; training needs one tile size"
        )
    height, width = train_images.shape[1:3]
    if height != width:
        raise LayoutError(f"{images_folder}: tiles are {width}x{height}; the classifier expects square tiles")
    if crop_size is not None and crop_size > height:
        raise LayoutError(
            f"{images_folder}: classifier.crop_size is {crop_size} px but the tiles are {width}x{height}; "
            f"expected a crop no larger than a tile"
        )
    train_labels = [tile.positive for tile in train_tiles]
    validation_labels = [tile.positive for tile in validation_tiles]
    train_dataset = TileDataset(
        train_images,
        train_labels,
        augmentation=build_augmentation(augment, seed, crop_size),
        repeats=crops_per_tile if crop_size is not None else 1,
    )
    return train_dataset, TileDataset(validation_images, validation_labels), int(height)
