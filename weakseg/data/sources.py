"""Dispatch by ``data.source``: write the chosen dataset in MHIST's layout into a target folder."""

from __future__ import annotations

from pathlib import Path

from weakseg.data.folder import import_folder
from weakseg.data.layout import Tile, check_tile_files, read_annotations
from weakseg.data.mhist import MHIST_TILE_SIZE, import_mhist
from weakseg.data.synthetic import generate_dataset
from weakseg.errors import UserInputError
from weakseg.params import DataParams

SYNTHETIC_NEGATIVE_LABEL = "HP"


def expected_tile_size(data: DataParams) -> int | None:
    """The tile side the dataset must have: ``data.tile_size`` when set, else the source's own."""
    if data.tile_size is not None:
        return data.tile_size
    if data.source == "synthetic":
        return data.synthetic.tile_size
    if data.source == "mhist":
        return MHIST_TILE_SIZE
    return None


def build_dataset(data: DataParams, target: Path) -> tuple[list[Tile], bool]:
    """Writes the dataset chosen by ``data.source`` into ``target`` and validates the result.

    Args:
        data: the ``data`` params section.
        target: an empty folder (the stage's temporary twin of ``data/raw``).

    Returns:
        The tiles (as read back from the written ``annotations.csv``) and whether masks were written.

    Raises:
        UserInputError: a subclass naming the parameter or file at fault.
    """
    target = Path(target)
    if data.source == "synthetic":
        if data.tile_size is not None and data.tile_size != data.synthetic.tile_size:
            raise UserInputError(
                f"data.tile_size is {data.tile_size} but data.synthetic.tile_size is {data.synthetic.tile_size}; "
                "make them equal or set data.tile_size: null"
            )
        if data.positive_label == SYNTHETIC_NEGATIVE_LABEL:
            raise UserInputError(
                f"data.positive_label is {data.positive_label!r}, the synthetic source's negative label; "
                "use another label (the default is SSA)"
            )
        generate_dataset(target, data.synthetic, data.positive_label, SYNTHETIC_NEGATIVE_LABEL)
    elif data.source == "mhist":
        import_mhist(data.mhist, target, data.positive_label, expected_tile_size(data))
    elif data.source == "folder":
        import_folder(data.folder.path, target, data.positive_label, expected_tile_size(data))
    else:  # the schema's Literal makes this unreachable; kept so a new source cannot be silently ignored
        raise UserInputError(f"data.source: unknown source {data.source!r}")
    tiles = read_annotations(target / "annotations.csv", data.positive_label)
    has_masks = check_tile_files(target, tiles, expected_tile_size(data))
    return tiles, has_masks
