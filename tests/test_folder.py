"""Tests of the folder source (weakseg/data/folder.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from weakseg.data.folder import FolderSourceError, import_folder
from weakseg.data.layout import LayoutError, Tile, write_annotations
from weakseg.io import write_png


def make_dataset(root: Path, size: int = 32, masks: bool = True) -> list[Tile]:
    tiles = [
        Tile("a.png", "HGIN", "train", True),
        Tile("b.png", "Polyp", "train", False),
        Tile("c.png", "Polyp", "test", False),
    ]
    rng = np.random.default_rng(0)
    for tile in tiles:
        write_png(root / "images" / tile.name, rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))
        if masks:
            write_png(root / "masks" / tile.name, np.zeros((size, size), dtype=bool) | tile.positive)
    write_annotations(root / "annotations.csv", tiles)
    return tiles


def test_copies_images_masks_and_annotations(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "raw"
    make_dataset(source)
    # A file in the source that annotations.csv does not list is not copied.
    write_png(source / "images" / "unlisted.png", np.zeros((32, 32, 3), dtype=np.uint8))
    tiles = import_folder(source, target, "HGIN", tile_size=32)
    assert [tile.positive for tile in tiles] == [True, False, False]
    assert sorted(path.name for path in (target / "images").iterdir()) == ["a.png", "b.png", "c.png"]
    for folder in ("images", "masks"):
        for name in ("a.png", "b.png", "c.png"):
            copied = target / folder / name
            assert not copied.is_symlink()
            assert copied.read_bytes() == (source / folder / name).read_bytes()
    assert (target / "annotations.csv").read_text() == (source / "annotations.csv").read_text()


def test_without_masks(tmp_path: Path) -> None:
    make_dataset(tmp_path / "source", masks=False)
    import_folder(tmp_path / "source", tmp_path / "raw", "HGIN", tile_size=None)
    assert not (tmp_path / "raw" / "masks").exists()


def test_unknown_positive_label(tmp_path: Path) -> None:
    make_dataset(tmp_path / "source")
    with pytest.raises(LayoutError, match="positive label 'SSA' is not among the labels"):
        import_folder(tmp_path / "source", tmp_path / "raw", "SSA", tile_size=None)


def test_wrong_tile_size(tmp_path: Path) -> None:
    make_dataset(tmp_path / "source", size=32)
    with pytest.raises(LayoutError, match="a.png: size 32x32, expected 64x64"):
        import_folder(tmp_path / "source", tmp_path / "raw", "HGIN", tile_size=64)


@pytest.mark.parametrize("path", ["", "does-not-exist"])
def test_bad_path_names_the_parameter(tmp_path: Path, path: str) -> None:
    with pytest.raises(FolderSourceError, match="data.folder.path"):
        import_folder(path, tmp_path / "raw", "HGIN", tile_size=None)
