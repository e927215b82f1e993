"""The segmenter's data: batches of the curriculum's epochs, the splits and their masks decoded from the files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_train_segmenter import TILE, _band_pseudo_mask
from weakseg.data.layout import Tile
from weakseg.io import write_png
from weakseg.params.training import AugmentParams
from weakseg.training.augment import build_augmentation
from weakseg.training.datasets import TileDataset
from weakseg.training.segmenter_data import (
    EpochSeededDataset,
    SegmenterInputError,
    batch_loader,
    load_segmenter_split,
    load_segmenter_splits,
    segmenter_splits,
    training_batches,
)


def test_training_batches_never_leave_a_single_tile() -> None:
    assert [len(batch) for batch in training_batches(np.arange(9), 4)] == [4, 5]
    assert [len(batch) for batch in training_batches(np.arange(8), 4)] == [4, 4]
    assert training_batches(np.arange(1), 4) == []


def test_loaders_with_workers_serve_plain_and_augmented_tiles_reproducibly() -> None:
    """Validation tiles (plain, unaugmented) load in workers exactly as in the main process; augmented
    training tiles load the same way twice for one epoch seed, whatever the workers."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    masks = rng.uniform(size=(6, 16, 16)) > 0.5
    labels = [True, False] * 3
    batches = [[0, 1, 2], [3, 4, 5]]

    def load(dataset: TileDataset, workers: int) -> list[torch.Tensor]:
        return [
            torch.cat([images.flatten(), mask.flatten()]) for images, _, mask in batch_loader(dataset, batches, workers)
        ]

    plain = TileDataset(images, labels, masks, None)
    assert all(torch.equal(a, b) for a, b in zip(load(plain, 0), load(plain, 2), strict=True))
    augmented = EpochSeededDataset(images, labels, masks, build_augmentation(AugmentParams(), 0))
    augmented.start_epoch(7)
    first = load(augmented, 2)
    augmented.start_epoch(7)
    assert all(torch.equal(a, b) for a, b in zip(first, load(augmented, 2), strict=True))
    augmented.start_epoch(8)
    assert not all(torch.equal(a, b) for a, b in zip(first, load(augmented, 2), strict=True))


def test_a_split_reads_the_pseudo_masks_ignored_band(tmp_path: Path) -> None:
    from weakseg.io import pseudo_mask_pixels

    foreground, ignore = _band_pseudo_mask(TILE)
    write_png(tmp_path / "images/a.png", np.zeros((TILE, TILE, 3), dtype=np.uint8))
    write_png(tmp_path / "pseudo_masks/a.png", pseudo_mask_pixels(foreground, ignore))
    tile = Tile("a.png", "SSA", "train", True)
    data = load_segmenter_split(tmp_path / "images", tmp_path / "pseudo_masks", [tile], "train", pseudo_masks=True)
    expected = foreground.astype(np.uint8)
    expected[ignore] = 255
    np.testing.assert_array_equal(data.masks[0], expected)
    assert data.positives.tolist() == [True]


def _write_split(folder: Path, sizes: list[int], mask_sizes: list[int] | None = None) -> list[Tile]:
    tiles = []
    for index, size in enumerate(sizes):
        name = f"tile_{index}.png"
        mask_size = size if mask_sizes is None else mask_sizes[index]
        write_png(folder / "images" / name, np.zeros((size, size, 3), dtype=np.uint8))
        write_png(folder / "masks" / name, np.ones((mask_size, mask_size), dtype=bool))
        tiles.append(Tile(name, "SSA" if index % 2 == 0 else "HP", "train", index % 2 == 0))
    return tiles


def test_both_splits_load_with_their_tile_size(tmp_path: Path) -> None:
    tiles = _write_split(tmp_path, [TILE] * 3)
    train, validation, tile_size = load_segmenter_splits(
        tmp_path / "images", tmp_path / "masks", tiles[:2], tiles[2:], pseudo_masks=False
    )
    assert tile_size == TILE and (len(train.images), len(validation.images)) == (2, 1)
    assert train.masks.dtype == bool and train.masks.all()  # true masks: 0/255 PNGs read as booleans


@pytest.mark.parametrize("pseudo_masks", [False, True])
@pytest.mark.parametrize(("mask_sizes", "wrong"), [([16, 16], 0), ([TILE, 16, TILE], 1)])
def test_a_mask_of_another_size_names_its_file(
    tmp_path: Path, mask_sizes: list[int], wrong: int, pseudo_masks: bool
) -> None:
    """All masks of one wrong size, or one among right-sized ones: the first wrong file is named."""
    tiles = _write_split(tmp_path, [TILE] * len(mask_sizes), mask_sizes=mask_sizes)
    with pytest.raises(SegmenterInputError, match=rf"tile_{wrong}\.png: mask is 16x16, its tile is {TILE}x{TILE}"):
        load_segmenter_split(tmp_path / "images", tmp_path / "masks", tiles, "train", pseudo_masks=pseudo_masks)


def test_splits_of_different_tile_sizes_are_refused(tmp_path: Path) -> None:
    tiles = _write_split(tmp_path, [TILE, TILE, 16])
    with pytest.raises(SegmenterInputError, match="training needs one tile size"):
        load_segmenter_splits(tmp_path / "images", tmp_path / "masks", tiles[:2], tiles[2:], pseudo_masks=False)


def _annotated(count: int, positive: bool | None = None) -> list[Tile]:
    return [
        Tile(f"t{index}.png", "SSA", "train", index % 2 == 0 if positive is None else positive)
        for index in range(count)
    ] + [Tile("test.png", "SSA", "test", True)]


def test_the_split_is_the_train_partitions_stratified_cut() -> None:
    train, validation = segmenter_splits(_annotated(12), 0.34, 1, Path("annotations.csv"), "SSA")
    assert len(train) + len(validation) == 12 and validation
    assert all(tile.partition == "train" for tile in train + validation)
    assert any(tile.positive for tile in validation) and any(not tile.positive for tile in validation)


def test_a_split_without_a_positive_training_tile_or_a_validation_share_is_refused() -> None:
    with pytest.raises(SegmenterInputError, match="annotations.csv: no 'SSA' tile in the training split"):
        segmenter_splits(_annotated(6, positive=False), 0.34, 1, Path("annotations.csv"), "SSA")
    with pytest.raises(SegmenterInputError, match=r"annotations.csv: .*\(see split.validation_fraction\)"):
        segmenter_splits(_annotated(2), 0.34, 1, Path("annotations.csv"), "SSA")
