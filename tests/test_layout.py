"""Tests of MHIST's dataset layout (weakseg/data/layout.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakseg.data.layout import (
    LayoutError,
    Tile,
    check_tile_files,
    partition,
    read_annotations,
    split_train_validation,
    write_annotations,
)
from weakseg.io import write_png

HEADER = "Image Name,Majority Vote Label,Partition\n"


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "annotations.csv"
    path.write_text(text)
    return path


def test_round_trip_with_annotators(tmp_path: Path) -> None:
    tiles = [Tile("a.png", "SSA", "train", True, 7), Tile("b.png", "HP", "test", False, None)]
    write_annotations(tmp_path / "annotations.csv", tiles)
    assert read_annotations(tmp_path / "annotations.csv", "SSA") == tiles
    assert (tmp_path / "annotations.csv").read_text().splitlines()[0].endswith("(Out of 7)")


def test_reads_bom_spaces_and_any_column_order(tmp_path: Path) -> None:
    path = tmp_path / "annotations.csv"
    path.write_bytes("\ufeffPartition, Image Name ,Majority Vote Label\nTRAIN,a.png,SSA\ntest,b.png,HP\n".encode())
    tiles = read_annotations(path, "SSA")
    found = [(tile.name, tile.partition, tile.positive) for tile in tiles]
    assert found == [("a.png", "train", True), ("b.png", "test", False)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Image Name,Partition\na.png,train\n", r"missing column\(s\) \['Majority Vote Label'\]"),
        (HEADER + "a.png,SSA,validation\nb.png,HP,train\n", "partition 'validation'"),
        (HEADER + "a.png,SSA,train\na.png,HP,train\n", "listed twice"),
        (HEADER + "a.png,HP,train\nb.png,NORMAL,train\n", "positive label 'SSA' is not among"),
        (HEADER + "a.png,SSA,train\nb.png,SSA,test\n", "a binary task needs a negative label"),
        (HEADER + "../a.png,SSA,train\nb.png,HP,train\n", "must be a plain file name"),
        (HEADER + ",SSA,train\n", "empty image name"),
        (HEADER, "no tiles listed"),
    ],
)
def test_bad_annotations_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(LayoutError, match=message) as raised:
        read_annotations(_csv(tmp_path, text), "SSA")
    assert "annotations.csv" in str(raised.value)


def test_missing_annotations_file(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="annotations file not found"):
        read_annotations(tmp_path / "annotations.csv", "SSA")


def _tiles(count: int, positives: int) -> list[Tile]:
    return [
        Tile(f"t{index:03d}.png", "SSA" if index < positives else "HP", "train", index < positives)
        for index in range(count)
    ]


def test_split_is_stratified_seeded_and_order_free() -> None:
    tiles = _tiles(50, 15)
    train, validation = split_train_validation(tiles, 0.2, seed=7)
    assert len(validation) == 10 and sum(tile.positive for tile in validation) == 3
    assert set(train).isdisjoint(validation) and len(train) + len(validation) == 50
    again = split_train_validation(list(reversed(tiles)), 0.2, seed=7)
    assert again == (train, validation)
    assert split_train_validation(tiles, 0.2, seed=8)[1] != validation


def test_split_refuses_test_tiles_and_bad_fractions() -> None:
    tiles = _tiles(10, 4) + [Tile("x.png", "HP", "test", False)]
    with pytest.raises(ValueError, match="test partition is held out"):
        split_train_validation(tiles, 0.2, 0)
    with pytest.raises(ValueError, match="validation_fraction"):
        split_train_validation(_tiles(10, 4), 1.0, 0)
    assert [tile.name for tile in partition(tiles, "test")] == ["x.png"]
    with pytest.raises(ValueError, match="partition"):
        partition(tiles, "val")


def _dataset(root: Path, size: int = 16) -> list[Tile]:
    tiles = [Tile("a.png", "SSA", "train", True), Tile("b.png", "HP", "test", False)]
    for tile in tiles:
        write_png(root / "images" / tile.name, np.full((size, size, 3), 200, dtype=np.uint8))
    return tiles


def test_check_tile_files_accepts_good_data_and_reports_masks(tmp_path: Path) -> None:
    tiles = _dataset(tmp_path)
    assert check_tile_files(tmp_path, tiles, 16) is False
    for tile in tiles:
        write_png(tmp_path / "masks" / tile.name, np.zeros((16, 16), dtype=bool))
    assert check_tile_files(tmp_path, tiles, None) is True


def test_check_tile_files_names_the_bad_file(tmp_path: Path) -> None:
    tiles = _dataset(tmp_path)
    with pytest.raises(LayoutError, match="a.png: size 16x16, expected 32x32"):
        check_tile_files(tmp_path, tiles, 32)
    (tmp_path / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(LayoutError, match="b.png: cannot decode image"):
        check_tile_files(tmp_path, tiles, 16)
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(LayoutError, match="b.png: listed in annotations.csv but missing"):
        check_tile_files(tmp_path, tiles, 16)


def test_check_tile_files_refuses_grey_images_and_bad_masks(tmp_path: Path) -> None:
    tiles = _dataset(tmp_path)
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    with pytest.raises(LayoutError, match="a.png: image mode L, expected RGB"):
        check_tile_files(tmp_path, tiles, 16)
    tiles = _dataset(tmp_path)
    write_png(tmp_path / "masks" / "a.png", np.zeros((8, 8), dtype=bool))
    with pytest.raises(LayoutError, match="a.png: mask size"):
        check_tile_files(tmp_path, tiles, 16)
    write_png(tmp_path / "masks" / "a.png", np.zeros((16, 16), dtype=bool))
    with pytest.raises(LayoutError, match="b.png: masks/ exists but this tile's mask is missing"):
        check_tile_files(tmp_path, tiles, 16)
    with pytest.raises(LayoutError, match="images folder not found"):
        check_tile_files(tmp_path / "nowhere", tiles, 16)
