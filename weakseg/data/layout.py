"""MHIST's dataset layout, used for every source.

A dataset folder holds ``images/NAME.png``, ``annotations.csv`` with MHIST's columns, and optionally
``masks/NAME.png`` (pixel truth of the positive class, used only to score).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weakseg.errors import UserInputError
from weakseg.io import write_csv

NAME_COLUMN = "Image Name"
LABEL_COLUMN = "Majority Vote Label"
PARTITION_COLUMN = "Partition"
ANNOTATORS_COLUMN = "Number of Annotators who Selected SSA (Out of 7)"
REQUIRED_COLUMNS = (NAME_COLUMN, LABEL_COLUMN, PARTITION_COLUMN)
PARTITIONS = ("train", "test")


class LayoutError(UserInputError):
    """Raised when a dataset folder does not follow the layout."""


@dataclass(frozen=True)
class Tile:
    """One annotated tile."""

    name: str
    label: str
    partition: str
    positive: bool
    annotators: int | None = None

    @property
    def stem(self) -> str:
        """The file name without its extension."""
        return Path(self.name).stem


def read_annotations(path: str | Path, positive_label: str) -> list[Tile]:
    """Reads ``annotations.csv`` in MHIST's format.

    Args:
        path: the CSV file.
        positive_label: the label of the positive class (MHIST: ``SSA``); every other label is negative.

    Returns:
        Tiles in file order.

    Raises:
        LayoutError: naming the file and the problem (missing file or column, bad partition, duplicate
            name, no tile with the positive label).
    """
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path}: annotations file not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [column.strip() for column in (reader.fieldnames or [])]
        missing = [column for column in REQUIRED_COLUMNS if column not in columns]
        if missing:
            raise LayoutError(
                f"{path}: missing column(s) {missing}; expected MHIST's columns {list(REQUIRED_COLUMNS)}, "
                f"found {columns}"
            )
        rows = [{(key or "").strip(): (value or "").strip() for key, value in row.items()} for row in reader]
    tiles: list[Tile] = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        name, label, partition = row[NAME_COLUMN], row[LABEL_COLUMN], row[PARTITION_COLUMN].lower()
        if not name or not label:
            raise LayoutError(f"{path}:{line}: empty image name or label")
        if Path(name).name != name or name.startswith("."):
            raise LayoutError(f"{path}:{line}: image name {name!r} must be a plain file name")
        if partition not in PARTITIONS:
            raise LayoutError(f"{path}:{line}: partition {row[PARTITION_COLUMN]!r}, expected one of {PARTITIONS}")
        if name in seen:
            raise LayoutError(f"{path}:{line}: image {name!r} is listed twice")
        seen.add(name)
        annotators_text = row.get(ANNOTATORS_COLUMN, "")
        annotators = int(annotators_text) if annotators_text.isdigit() else None
        tiles.append(Tile(name, label, partition, label == positive_label, annotators))
    if not tiles:
        raise LayoutError(f"{path}: no tiles listed")
    labels = sorted({tile.label for tile in tiles})
    if positive_label not in labels:
        raise LayoutError(
            f"{path}: positive label {positive_label!r} is not among the labels {labels}; "
            f"set data.positive_label to one of them"
        )
    if len(labels) < 2:
        raise LayoutError(f"{path}: every tile is labelled {labels[0]!r}; a binary task needs a negative label")
    return tiles


def write_annotations(path: str | Path, tiles: Iterable[Tile]) -> None:
    """Writes ``annotations.csv`` with MHIST's columns, atomically."""
    tiles = list(tiles)
    with_annotators = any(tile.annotators is not None for tile in tiles)
    columns = [NAME_COLUMN, LABEL_COLUMN, PARTITION_COLUMN] + ([ANNOTATORS_COLUMN] if with_annotators else [])
    rows = []
    for tile in tiles:
        row = {NAME_COLUMN: tile.name, LABEL_COLUMN: tile.label, PARTITION_COLUMN: tile.partition}
        if with_annotators:
            row[ANNOTATORS_COLUMN] = "" if tile.annotators is None else str(tile.annotators)
        rows.append(row)
    write_csv(path, rows, columns)


def partition(tiles: Sequence[Tile], name: str) -> list[Tile]:
    """The tiles of one partition (``train`` or ``test``)."""
    if name not in PARTITIONS:
        raise ValueError(f"partition {name!r}, expected one of {PARTITIONS}")
    return [tile for tile in tiles if tile.partition == name]


def _figure_candidates(tiles: Sequence[Tile], positive: bool) -> list[Tile]:
    """The tiles of one class in name order, train tiles only unless the train partition has none."""
    members = sorted((tile for tile in tiles if tile.positive == positive), key=lambda tile: tile.name)
    train = [tile for tile in members if tile.partition == "train"]
    return train or members


def figure_negative_tile(tiles: Sequence[Tile]) -> Tile | None:
    """The one negative tile that :func:`pick_figure_tiles` shows (``generate_cams`` always draws its CAM)."""
    negatives = _figure_candidates(tiles, positive=False)
    return negatives[0] if negatives else None


def pick_figure_tiles(tiles: Sequence[Tile], count: int) -> list[Tile]:
    """Up to ``count`` positive tiles spread over the name order, then one negative tile.

    Train-partition tiles are preferred (the figure is for looking at the training signal); test tiles are
    used only where the train partition has none of a class.
    """
    if count <= 0:
        return []
    positives = _figure_candidates(tiles, positive=True)
    chosen: list[Tile] = []
    if positives:
        indices = np.linspace(0, len(positives) - 1, num=min(count, len(positives))).round().astype(int)
        chosen.extend(positives[index] for index in dict.fromkeys(indices.tolist()))
    negative = figure_negative_tile(tiles)
    if negative is not None:
        chosen.append(negative)
    return chosen


def split_train_validation(
    tiles: Sequence[Tile], validation_fraction: float, seed: int
) -> tuple[list[Tile], list[Tile]]:
    """Carves a stratified, seeded validation split from the ``train`` partition.

    Test tiles are refused, so that model selection can never see them. The split depends only on the
    tile names, labels and the seed, not on the order the tiles come in.

    Returns:
        ``(train, validation)``, each sorted by name.

    Raises:
        ValueError: if a test tile is passed, or a class is too small to appear in both splits.
    """
    if any(tile.partition != "train" for tile in tiles):
        raise ValueError("split_train_validation takes train-partition tiles only; the test partition is held out")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    rng = np.random.default_rng(seed)
    train: list[Tile] = []
    validation: list[Tile] = []
    for positive in (False, True):
        members = sorted((tile for tile in tiles if tile.positive == positive), key=lambda tile: tile.name)
        if not members:
            continue
        order = rng.permutation(len(members))
        count = int(round(validation_fraction * len(members)))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        else:
            count = 0
        chosen = set(order[:count].tolist())
        for index, tile in enumerate(members):
            (validation if index in chosen else train).append(tile)
    if not validation:
        raise ValueError("the validation split is empty: too few train tiles for validation_fraction")
    return sorted(train, key=lambda tile: tile.name), sorted(validation, key=lambda tile: tile.name)


def _decoded_size_and_mode(path: Path, what: str) -> tuple[tuple[int, int], str]:
    """Decodes ``path`` fully (a truncated PNG fails here, not in a later stage) and returns its size and mode.

    Raises:
        LayoutError: naming the file, if it cannot be decoded as an image (``what``: "image" or "mask").
    """
    from PIL import Image, UnidentifiedImageError  # local: only the layout check decodes here

    try:
        with Image.open(path) as image:
            image.load()
            return image.size, image.mode
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise LayoutError(f"{path}: cannot decode {what} ({error})") from None


def check_tile_files(root: str | Path, tiles: Sequence[Tile], tile_size: int | None = None) -> bool:
    """Checks that every listed image exists, decodes as RGB and (optionally) has the expected size.

    Also checks masks where a ``masks/`` folder exists.

    Returns:
        Whether the dataset has pixel truth (a ``masks/`` folder).

    Raises:
        LayoutError: naming the first bad file and the problem.
    """
    root = Path(root)
    images = root / "images"
    if not images.is_dir():
        raise LayoutError(f"{images}: images folder not found")
    masks = root / "masks"
    has_masks = masks.is_dir()
    for tile in tiles:
        image_path = images / tile.name
        if not image_path.is_file():
            raise LayoutError(f"{image_path}: listed in annotations.csv but missing")
        size, mode = _decoded_size_and_mode(image_path, "image")
        if mode not in ("RGB", "RGBA"):
            raise LayoutError(f"{image_path}: image mode {mode}, expected RGB")
        if tile_size is not None and size != (tile_size, tile_size):
            raise LayoutError(f"{image_path}: size {size[0]}x{size[1]}, expected {tile_size}x{tile_size}")
        if has_masks:
            mask_path = masks / tile.name
            if not mask_path.is_file():
                raise LayoutError(f"{mask_path}: masks/ exists but this tile's mask is missing")
            mask_size, _ = _decoded_size_and_mode(mask_path, "mask")
            if mask_size != size:
                raise LayoutError(f"{mask_path}: mask size {mask_size} differs from its image's {size}")
    return has_masks
