"""File I/O at the edges: images, JSON, CSV, and atomic writes.

Every output is written to a temporary path beside its target and renamed into place, so a stage killed
half-way never leaves a file or folder that looks complete.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from weakseg.errors import UserInputError


class ImageReadError(UserInputError):
    """Raised when an image file cannot be read as expected."""


_READABLE_MODES = ("RGB", "RGBA", "L", "LA", "P", "I;16", "I", "1")


def _decode(path: str | Path, mode: str, what: str) -> np.ndarray:
    """Decodes an image file converted to ``mode``, naming the file in any error."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: {what} file not found")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in _READABLE_MODES:
                raise ImageReadError(f"{path}: unsupported image mode {image.mode}")
            return np.ascontiguousarray(np.asarray(image.convert(mode)))
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageReadError(f"{path}: cannot decode {what} ({error})") from None


def read_rgb(path: str | Path) -> np.ndarray:
    """Reads an image as an ``(H, W, 3)`` uint8 RGB array.

    Raises:
        ImageReadError: naming the file, if it is missing, corrupt or of an unsupported mode.
    """
    return _decode(path, "RGB", "image")


def read_mask(path: str | Path) -> np.ndarray:
    """Reads a single-channel mask as a boolean ``(H, W)`` array (pixels >= 128 are foreground).

    Raises:
        ImageReadError: naming the file, if it is missing or corrupt.
    """
    return _decode(path, "L", "mask") >= 128


# A pseudo-mask PNG (``data/pseudo_masks``): 0 background, 255 foreground, 128 ignored by the segmenter's loss.
PSEUDO_BACKGROUND = 0
PSEUDO_IGNORE = 128
PSEUDO_FOREGROUND = 255


def pseudo_mask_pixels(foreground: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
    """Encodes a pseudo-mask as uint8 pixels: 255 on ``foreground``, 128 on ``ignore``, 0 elsewhere.

    Without an ignored pixel the pixels are exactly :func:`write_png`'s encoding of the boolean foreground.

    Raises:
        ValueError: if the shapes differ or a pixel is both foreground and ignored.
    """
    foreground = np.asarray(foreground, dtype=bool)
    pixels = np.where(foreground, np.uint8(PSEUDO_FOREGROUND), np.uint8(PSEUDO_BACKGROUND)).astype(np.uint8)
    if ignore is None:
        return pixels
    ignore = np.asarray(ignore, dtype=bool)
    if ignore.shape != foreground.shape:
        raise ValueError(f"ignore mask shape {ignore.shape} differs from the foreground's {foreground.shape}")
    if (ignore & foreground).any():
        raise ValueError("a pseudo-mask pixel cannot be both foreground and ignored")
    pixels[ignore] = PSEUDO_IGNORE
    return pixels


def read_pseudo_mask(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads a pseudo-mask PNG as ``(foreground, ignore)`` boolean ``(H, W)`` arrays.

    Pixels equal to 128 are ignored (never foreground); of the others, those ``>= 128`` are foreground, as
    :func:`read_mask` reads them, so a two-label (0/255) file reads exactly as before.

    Raises:
        ImageReadError: naming the file, if it is missing or corrupt.
    """
    pixels = _decode(path, "L", "mask")
    ignore = pixels == PSEUDO_IGNORE
    return (pixels >= 128) & ~ignore, ignore


def read_gray(path: str | Path) -> np.ndarray:
    """Reads a single-channel 8-bit image (a CAM heatmap) as a uint8 ``(H, W)`` array.

    Raises:
        ImageReadError: naming the file, if it is missing or corrupt.
    """
    return _decode(path, "L", "image")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    # mkstemp creates 0600; outputs get the permissions an ordinary file would.
    os.chmod(name, 0o666 & ~_current_umask())
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary file path that is renamed to ``path`` only if the block succeeds."""
    path = Path(path)
    temporary = _temporary_sibling(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Writes a uint8 array (``(H, W)``, ``(H, W, 3)``) or a boolean mask (as 0/255) as PNG, atomically."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise TypeError(f"{path}: expected uint8 or bool pixels, got {array.dtype}")
    with atomic_path(path) as temporary:
        # PNG metadata is left out so that equal pixels give equal bytes (DVC's cache relies on it).
        Image.fromarray(array).save(temporary, format="PNG", optimize=False, compress_level=6)


def write_json(path: str | Path, data: Any) -> None:
    """Writes JSON with sorted keys atomically (stable bytes for DVC)."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str]) -> None:
    """Writes rows as CSV with a header, atomically: ``\\n`` line ends, floats as ``%.6g`` (stable bytes).

    Other values are written as :mod:`csv` writes them (``str``; ``None`` as an empty field).

    Raises:
        ValueError: if a row holds a key that is not in ``fieldnames``.
    """
    with atomic_path(path) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fieldnames), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()}
            )


def read_json(path: str | Path) -> Any:
    """Reads a JSON file, naming the file in any error."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yields an empty temporary folder that replaces ``path`` only if the block succeeds.

    A stage writes all of one output folder inside the block; if it is killed or fails, the previous
    folder (or none) stays and the temporary one is removed (or left under a dotted name that no stage
    reads, if the process was killed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(temporary, 0o777 & ~_current_umask())  # mkdtemp creates 0700
    try:
        yield temporary
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(temporary, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def remove_stale_temporaries(folder: str | Path) -> None:
    """Removes temporary siblings left by a killed process (names starting with '.' and ending '.tmp')."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.startswith(".") and (entry.name.endswith(".tmp") or entry.name.endswith(".old")):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
