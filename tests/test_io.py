"""Tests of weakseg.io's pseudo-mask encoding: 0 background, 128 ignored, 255 foreground."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from weakseg.io import pseudo_mask_pixels, read_mask, read_pseudo_mask, write_png


def _labels() -> tuple[np.ndarray, np.ndarray]:
    foreground = np.zeros((6, 7), dtype=bool)
    foreground[1:3, 1:4] = True
    ignore = np.zeros((6, 7), dtype=bool)
    ignore[4:, 2:6] = True
    return foreground, ignore


def test_pseudo_mask_png_round_trip_keeps_three_labels(tmp_path: Path) -> None:
    foreground, ignore = _labels()
    path = tmp_path / "mask.png"
    write_png(path, pseudo_mask_pixels(foreground, ignore))
    pixels = np.asarray(Image.open(path))
    assert pixels.dtype == np.uint8 and set(np.unique(pixels).tolist()) == {0, 128, 255}
    assert (pixels[ignore] == 128).all() and (pixels[foreground] == 255).all()
    read_foreground, read_ignore = read_pseudo_mask(path)
    np.testing.assert_array_equal(read_foreground, foreground)
    np.testing.assert_array_equal(read_ignore, ignore)
    # read_mask (>= 128) would call the band lesion: pseudo-masks need read_pseudo_mask.
    assert read_mask(path)[ignore].all()


def test_two_label_pseudo_masks_read_exactly_as_before(tmp_path: Path) -> None:
    foreground, _ = _labels()
    old = tmp_path / "old.png"
    write_png(old, foreground)  # today's 0/255 file
    read_foreground, read_ignore = read_pseudo_mask(old)
    np.testing.assert_array_equal(read_foreground, read_mask(old))
    assert not read_ignore.any()
    # Without an ignored pixel the new encoding writes the very same bytes.
    new = tmp_path / "new.png"
    write_png(new, pseudo_mask_pixels(foreground, np.zeros_like(foreground)))
    assert new.read_bytes() == old.read_bytes()
    # Any grey other than 128 reads as read_mask reads it.
    grey = tmp_path / "grey.png"
    write_png(grey, np.array([[0, 100, 127, 129, 200, 255]], dtype=np.uint8))
    read_foreground, read_ignore = read_pseudo_mask(grey)
    np.testing.assert_array_equal(read_foreground, read_mask(grey))
    assert not read_ignore.any()


def test_a_pixel_cannot_be_both_foreground_and_ignored() -> None:
    foreground, _ = _labels()
    with pytest.raises(ValueError, match="both foreground and ignored"):
        pseudo_mask_pixels(foreground, foreground)


def test_write_csv_formats_floats_and_writes_atomically(tmp_path: Path) -> None:
    from weakseg.io import write_csv

    path = tmp_path / "sub" / "rows.csv"
    rows: list[dict[str, Any]] = [{"a": 1, "b": 0.1234567891, "c": "x,y"}, {"a": 2, "b": np.float64(1e-7), "c": None}]
    write_csv(path, rows, ["a", "b", "c"])
    assert path.read_bytes() == b'a,b,c\n1,0.123457,"x,y"\n2,1e-07,\n'
    assert not list(path.parent.glob(".*.tmp"))
    write_csv(path, [], ["a"])  # no rows: the header alone
    assert path.read_bytes() == b"a\n"
    with pytest.raises(ValueError):
        write_csv(path, [{"z": 1}], ["a"])
    assert path.read_bytes() == b"a\n"  # a failed write leaves the previous file
