"""The classifier's data: datasets decoded from the tile files, the seeded epoch order, balanced draws, ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_train_classifier import TILE, _in_memory_datasets, _tile_image
from weakseg.data.layout import LayoutError, Tile
from weakseg.distributed import DistributedContext
from weakseg.io import write_png
from weakseg.params import AugmentParams
from weakseg.training import classifier_data
from weakseg.training.datasets import TileDataset


def _first_batch(dataset: TileDataset, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = next(iter(classifier_data.build_train_loader(dataset, 4, seed, epoch)))
    return images, labels


def test_loader_order_and_augmentation_repeat_per_seed_and_epoch_and_vary_across_epochs() -> None:
    first, _ = _in_memory_datasets()
    second, _ = _in_memory_datasets()
    images_a, labels_a = _first_batch(first, seed=7, epoch=2)
    images_b, labels_b = _first_batch(second, seed=7, epoch=2)
    assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    images_c, _ = _first_batch(first, seed=7, epoch=3)
    assert not torch.equal(images_a, images_c)


def test_drop_last_avoids_single_tile_batches() -> None:
    assert classifier_data.steps_per_epoch(9, 4) == 2 and classifier_data.train_drops_last(9, 4)
    assert classifier_data.steps_per_epoch(3, 4) == 1 and not classifier_data.train_drops_last(3, 4)
    with pytest.raises(ValueError):
        classifier_data.steps_per_epoch(0, 4)


def _imbalanced_labels(positives: int = 200, negatives: int = 20) -> list[bool]:
    """10:1 positives to negatives, interleaved."""
    labels = [True] * positives + [False] * negatives
    return [labels[index] for index in np.random.default_rng(0).permutation(len(labels))]


def test_balanced_sampler_draws_balanced_epochs_reproducibly_and_differently_per_epoch() -> None:
    labels = _imbalanced_labels()
    order = classifier_data.class_balanced_order(labels, seed=5, epoch=0)
    assert len(order) == len(labels)  # the epoch keeps the split's length, so the schedule's step count
    negatives = sum(not labels[index] for index in order)
    assert 0.4 < negatives / len(order) < 0.6  # ~half, against 1/11 in a shuffled epoch
    assert classifier_data.class_balanced_order(labels, seed=5, epoch=0) == order
    assert classifier_data.class_balanced_order(labels, seed=5, epoch=1) != order
    assert classifier_data.class_balanced_order(labels, seed=6, epoch=0) != order


def test_balanced_loader_serves_the_draw_and_ranks_share_it_like_the_shuffled_order() -> None:
    rng = np.random.default_rng(1)
    labels = _imbalanced_labels(20, 2)
    images = np.stack([_tile_image(rng, positive) for positive in labels])
    dataset = TileDataset(images, labels)
    served = torch.cat([batch[1] for batch in classifier_data.build_train_loader(dataset, 4, 3, 2, balanced=True)])
    order = classifier_data.class_balanced_order(labels, 3, 2)
    assert served.tolist() == [float(labels[index]) for index in order[: len(order) // 4 * 4]]
    assert int((served == 0).sum()) >= 5  # a shuffled epoch holds the 2 negatives at most
    # Two ranks: the strided shares of the same draw, put together, are the one-process global batches.
    shares = []
    for rank in range(2):
        context = DistributedContext(rank=rank, world_size=2)
        loader = classifier_data.build_train_loader(dataset, 4, 3, 2, context=context, balanced=True)
        assert loader.batch_sampler is not None
        shares.append([index for batch in loader.batch_sampler for index in batch])
    assert len(shares[0]) == len(shares[1])
    assert [index for pair in zip(*shares, strict=True) for index in pair] == order[: len(order) // 4 * 4]


# ------------------------------------------------------------------------------------ datasets from files
def _write_tiles(folder: Path, sizes: list[tuple[int, int]]) -> list[Tile]:
    tiles = []
    for index, (height, width) in enumerate(sizes):
        name = f"tile_{index}.png"
        write_png(folder / name, np.full((height, width, 3), 40 * index, dtype=np.uint8))
        tiles.append(Tile(name, "SSA" if index % 2 == 0 else "HP", "train", index % 2 == 0))
    return tiles


def test_datasets_hold_the_split_tiles_labels_and_tile_size(tmp_path: Path) -> None:
    tiles = _write_tiles(tmp_path, [(TILE, TILE)] * 5)
    train, validation, tile_size = classifier_data.load_classifier_datasets(
        tmp_path, tiles[:3], tiles[3:], AugmentParams(), seed=0
    )
    assert tile_size == TILE and (len(train), len(validation)) == (3, 2)
    assert train.labels.tolist() == [1.0, 0.0, 1.0] and validation.labels.tolist() == [0.0, 1.0]
    assert train.augmentation is not None and validation.augmentation is None


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ([(TILE, TILE), (TILE, TILE), (16, 16)], "training needs one tile size"),
        ([(TILE, 16), (TILE, 16), (TILE, 16)], "16x32; the classifier expects square tiles"),
    ],
)
def test_tiles_of_another_size_or_shape_are_a_layout_error_naming_the_folder(
    tmp_path: Path, sizes: list[tuple[int, int]], message: str
) -> None:
    tiles = _write_tiles(tmp_path, sizes)
    with pytest.raises(LayoutError, match=message) as caught:
        classifier_data.load_classifier_datasets(tmp_path, tiles[:2], tiles[2:], AugmentParams(), seed=0)
    assert str(tmp_path) in str(caught.value)


def test_crop_mode_trains_on_crops_of_the_tiles_and_validates_on_whole_tiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tiles = []
    for index in range(5):  # textured tiles, so a crop's place in its tile can be found
        write_png(tmp_path / f"t{index}.png", rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8))
        tiles.append(Tile(f"t{index}.png", "SSA" if index % 2 == 0 else "HP", "train", index % 2 == 0))
    train, validation, tile_size = classifier_data.load_classifier_datasets(
        tmp_path,
        tiles[:3],
        tiles[3:],
        AugmentParams(flips=False, rotate90=False, color_jitter=0.0, hue_jitter=0.0),
        seed=0,
        crop_size=16,
        crops_per_tile=4,
    )
    assert tile_size == TILE and (len(train), len(validation)) == (12, 2)
    # Item i is tile i % 3, so the labels repeat tile by tile, and a balanced draw sees every crop's label.
    assert train.labels.tolist() == [1.0, 0.0, 1.0] * 4 and train.tile_labels.tolist() == [1.0, 0.0, 1.0]
    crop, label = train[4]
    assert crop.shape == (3, 16, 16) and float(label) == 0.0
    whole, _ = validation[0]
    assert whole.shape == (3, TILE, TILE)
    # Each crop is a piece of its own tile: its pixels occur as a 16x16 window of the tile's tensor.
    tile_tensor = TileDataset(train.images, [True, False, True])[1][0]
    windows = tile_tensor.unfold(1, 16, 1).unfold(2, 16, 1)  # (3, positions, positions, 16, 16)
    matches = (windows == crop[:, None, None]).all(dim=0).all(dim=-1).all(dim=-1)
    assert bool(matches.any())
    # Draws of one tile differ (fresh crops), and a re-seeded dataset repeats them.
    train.set_augmentation_seed(7)
    first = [train[i][0] for i in (1, 4, 7, 10)]
    train.set_augmentation_seed(7)
    again = [train[i][0] for i in (1, 4, 7, 10)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(first[0], other) for other in first[1:])


def test_a_crop_larger_than_the_tiles_is_a_layout_error_naming_the_parameter(tmp_path: Path) -> None:
    tiles = _write_tiles(tmp_path, [(TILE, TILE)] * 3)
    with pytest.raises(LayoutError, match=rf"classifier.crop_size is {TILE + 1} px but the tiles are {TILE}x{TILE}"):
        classifier_data.load_classifier_datasets(
            tmp_path, tiles[:2], tiles[2:], AugmentParams(), seed=0, crop_size=TILE + 1
        )


def test_repeats_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        TileDataset(np.zeros((2, 8, 8, 3), dtype=np.uint8), [True, False], repeats=0)
