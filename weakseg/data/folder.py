"""The ``folder`` source: any dataset already in MHIST's layout, optionally with ``masks/``.

The files are copied (not linked) into the target folder, so that DVC caches the data itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tqdm import tqdm

from weakseg.data.layout import Tile, check_tile_files, read_annotations, write_annotations
from weakseg.errors import UserInputError


class FolderSourceError(UserInputError):
    """Raised when ``data.folder.path`` does not point at a usable dataset."""


def copy_dataset(source: Path, target: Path, tiles: list[Tile], with_masks: bool) -> None:
    """Copies the listed images (and masks) and writes ``annotations.csv`` under ``target``.

    Args:
        source: a validated dataset folder.
        target: the folder to fill (created if needed).
        tiles: the tiles to copy, as read from the source's annotations.
        with_masks: also copy ``masks/NAME.png``.
    """
    (target / "images").mkdir(parents=True, exist_ok=True)
    if with_masks:
        (target / "masks").mkdir(parents=True, exist_ok=True)
    for tile in tqdm(tiles, desc="copying tiles", unit="tile", leave=False):
        # copyfile, not copy2: file bytes only, so the copy does not depend on the source's timestamps.
        shutil.copyfile(source / "images" / tile.name, target / "images" / tile.name)
        if with_masks:
            shutil.copyfile(source / "masks" / tile.name, target / "masks" / tile.name)
    write_annotations(target / "annotations.csv", tiles)


def import_folder(path: str | Path, target: Path, positive_label: str, tile_size: int | None) -> list[Tile]:
    """Validates a dataset in MHIST's layout and copies it into ``target``.

    Args:
        path: the dataset folder (``data.folder.path``).
        target: where the copy goes.
        positive_label: the positive class's label (``data.positive_label``).
        tile_size: the expected tile side, or None to accept any size.

    Returns:
        The tiles, in the source's order.

    Raises:
        FolderSourceError: if no path is set or the folder does not exist.
        LayoutError: if the annotations or the files do not follow the layout.
    """
    if not str(path):
        raise FolderSourceError(
            "data.folder.path is empty; set it to a dataset folder in MHIST's layout "
            "(images/, annotations.csv, optionally masks/), e.g. ../shared/data/ebhi-hgin-polyp"
        )
    source = Path(path)
    if not source.is_dir():
        raise FolderSourceError(f"data.folder.path: {source} is not a folder (resolved from {Path.cwd()})")
    tiles = read_annotations(source / "annotations.csv", positive_label)
    with_masks = check_tile_files(source, tiles, tile_size)
    copy_dataset(source, target, tiles, with_masks)
    return tiles
