"""The ``mhist`` source: the real MHIST dataset (Wei et al. 2021).

MHIST is distributed after a research-use form at https://bmirds.github.io/MHIST/; the e-mail that
follows links ``images.zip``, ``annotations.csv`` and ``MD5SUMs.txt``. This module takes either a local
folder or zip holding those files (``data.mhist.path``) or their URLs (``data.mhist.*_url``, fetched with
urllib, so ``file://`` URLs work too), checks the MD5 sums where given, extracts the images safely
(members that would land outside the target folder are refused, and so is an archive with more members
or more uncompressed bytes than a few times MHIST's), and checks the annotations, every
image (present, decodable, 224x224 RGB) and MHIST's published counts.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from weakseg.data.folder import copy_dataset
from weakseg.data.layout import LayoutError, Tile, check_tile_files, partition, read_annotations
from weakseg.errors import UserInputError
from weakseg.params import MhistSourceParams

LOGGER = logging.getLogger(__name__)

MHIST_URL = "https://bmirds.github.io/MHIST/"
MHIST_TILE_SIZE = 224
MHIST_LABELS = ("SSA", "HP")
MHIST_COUNTS = {"total": 3152, "train": 2175, "test": 977}
IMAGES_ZIP = "images.zip"
ANNOTATIONS_CSV = "annotations.csv"
MD5SUMS_TXT = "MD5SUMs.txt"
#: Bounds on an archive, checked from its central directory before anything is extracted. MHIST's
#: images.zip holds 3,152 PNGs of 224x224 (under 400 MB uncompressed); the bounds leave a few times that,
#: and refuse a zip bomb or a wrong file before it fills the disk.
MAX_ARCHIVE_MEMBERS = 20_000
MAX_ARCHIVE_BYTES = 4 << 30  # total uncompressed size the members declare
MAX_MEMBER_BYTES = 1 << 30  # one member (a bundle zip holds images.zip whole)


class MhistSourceError(UserInputError):
    """Raised when the MHIST files are missing, corrupt, unsafe or not as published."""


def no_source_message() -> str:
    """What to do when no MHIST source is configured."""
    return (
        f"data.source is 'mhist' but no MHIST files are configured. MHIST is obtained from {MHIST_URL} "
        "after filling in its research-use form; then set data.mhist.path to the folder or zip holding "
        f"{IMAGES_ZIP} and {ANNOTATIONS_CSV} (and {MD5SUMS_TXT}), or set data.mhist.images_url, "
        "data.mhist.annotations_url (and data.mhist.md5sums_url) to the links from MHIST's e-mail"
    )


def md5_of(path: Path, chunk_size: int = 1 << 20) -> str:
    """The hex MD5 digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def parse_md5sums(path: Path) -> dict[str, str]:
    """Reads an ``md5sum``-style file (``HASH  NAME`` or ``HASH *NAME`` per line) into ``{name: hash}``.

    Raises:
        MhistSourceError: naming the line that is not in that format.
    """
    sums: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        digest = parts[0].lower()
        if len(parts) != 2 or len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
            raise MhistSourceError(f"{path}:{number}: expected 'MD5HASH  FILENAME', got {line!r}")
        name = parts[1].strip().lstrip("*")
        sums[PurePosixPath(name.replace("\\", "/")).name] = digest
    return sums


def verify_md5sums(folder: Path, md5sums: Path) -> list[str]:
    """Checks the MD5 of each file in ``folder`` that ``md5sums`` lists.

    Returns:
        The names that were checked.

    Raises:
        MhistSourceError: on a mismatch, or if the list names none of MHIST's files.
    """
    sums = parse_md5sums(md5sums)
    checked: list[str] = []
    for name in (IMAGES_ZIP, ANNOTATIONS_CSV):
        file = folder / name
        if name not in sums or not file.is_file():
            continue
        actual = md5_of(file)
        if actual != sums[name]:
            raise MhistSourceError(
                f"{file}: MD5 {actual} does not match {sums[name]} in {md5sums}; the download is corrupt "
                "or incomplete, fetch it again"
            )
        checked.append(name)
    if not checked:
        raise MhistSourceError(f"{md5sums}: lists none of {IMAGES_ZIP}, {ANNOTATIONS_CSV}")
    return checked


def check_archive_limits(archive: Path, members: list[zipfile.ZipInfo]) -> None:
    """Refuses an archive with more members or more declared bytes than the module's bounds allow.

    The sizes are those the central directory declares; extraction cannot write more than a member
    declares (``zipfile`` stops there, and the CRC check then fails), so checking them bounds what is
    written.

    Raises:
        MhistSourceError: naming the archive, what it declares and the bound it exceeds.
    """
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise MhistSourceError(
            f"{archive}: holds {len(members):,} members, more than the {MAX_ARCHIVE_MEMBERS:,} allowed "
            f"(MHIST has {MHIST_COUNTS['total']:,} images); refusing to extract"
        )
    for member in members:
        if member.file_size > MAX_MEMBER_BYTES:
            raise MhistSourceError(
                f"{archive}: member {member.filename!r} declares {member.file_size:,} bytes uncompressed, more "
                f"than the {MAX_MEMBER_BYTES:,} allowed for one member; refusing to extract"
            )
    total = sum(member.file_size for member in members)
    if total > MAX_ARCHIVE_BYTES:
        raise MhistSourceError(
            f"{archive}: declares {total:,} bytes uncompressed, more than the {MAX_ARCHIVE_BYTES:,} allowed "
            "(a few times MHIST's size); refusing to extract"
        )


def safe_extract(archive: Path, destination: Path) -> None:
    """Extracts a zip, refusing any member that would land outside ``destination``.

    Before anything is read or written, the member count and declared sizes are checked against
    :data:`MAX_ARCHIVE_MEMBERS`, :data:`MAX_ARCHIVE_BYTES` and :data:`MAX_MEMBER_BYTES`.

    Raises:
        MhistSourceError: naming the archive and the offending member or bound, or if the zip is corrupt.
    """
    destination = destination.resolve()
    try:
        with zipfile.ZipFile(archive) as handle:
            members = handle.infolist()
            check_archive_limits(archive, members)
            for member in members:
                name = member.filename
                target = (destination / name).resolve()
                is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
                if PurePosixPath(name).is_absolute() or name.startswith(("/", "\\")) or ":" in name.split("/")[0]:
                    raise MhistSourceError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
                if not target.is_relative_to(destination):
                    raise MhistSourceError(
                        f"{archive}: member {name!r} would be written outside {destination}; refusing to extract"
                    )
                if is_link:
                    raise MhistSourceError(f"{archive}: member {name!r} is a symbolic link; refusing to extract")
            bad = handle.testzip()
            if bad is not None:
                raise MhistSourceError(f"{archive}: member {bad!r} is corrupt (CRC mismatch)")
            handle.extractall(destination)
    except zipfile.BadZipFile as error:
        raise MhistSourceError(f"{archive}: not a valid zip archive ({error})") from None


def download(url: str, destination: Path) -> None:
    """Fetches ``url`` (http, https or file) into ``destination``.

    Raises:
        MhistSourceError: naming the URL, if it cannot be fetched.
    """
    try:
        with urllib.request.urlopen(url, timeout=60) as response, destination.open("wb") as handle:  # noqa: S310
            shutil.copyfileobj(response, handle, length=1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise MhistSourceError(f"cannot fetch {url} ({error}); check the URL from MHIST's e-mail") from None


def _find_file(root: Path, name: str) -> Path | None:
    """``root/name``, or the one such file below ``root`` (an archive may add a top-level folder)."""
    if (root / name).is_file():
        return root / name
    found = sorted(path for path in root.rglob(name) if path.is_file() and "__MACOSX" not in path.parts)
    return found[0] if found else None


def _images_folder(root: Path) -> Path:
    """The folder holding the extracted PNGs: ``images/`` if present, else the one folder with PNGs."""
    if (root / "images").is_dir():
        return root / "images"
    folders = sorted({path.parent for path in root.rglob("*.png") if "__MACOSX" not in path.parts})
    if len(folders) != 1:
        raise MhistSourceError(f"{root}: expected {IMAGES_ZIP} to hold one folder of PNG tiles, found {len(folders)}")
    return folders[0]


def _gather_files(params: MhistSourceParams, staging: Path) -> Path:
    """Puts images.zip, annotations.csv (and MD5SUMs.txt) into one folder and returns it."""
    if params.path:
        source = Path(params.path)
        if source.is_file() and zipfile.is_zipfile(source):
            unpacked = staging / "bundle"
            unpacked.mkdir()
            safe_extract(source, unpacked)
            annotations = _find_file(unpacked, ANNOTATIONS_CSV)
            return annotations.parent if annotations else unpacked
        if not source.is_dir():
            raise MhistSourceError(
                f"data.mhist.path: {source} is neither a folder nor a zip (resolved from {Path.cwd()})"
            )
        return source
    fetched = staging / "fetched"
    fetched.mkdir()
    if not params.images_url or not params.annotations_url:
        raise MhistSourceError(
            "data.mhist.images_url and data.mhist.annotations_url must both be set (or set data.mhist.path); "
            f"the links come in the e-mail sent after MHIST's research-use form at {MHIST_URL}"
        )
    download(params.images_url, fetched / IMAGES_ZIP)
    download(params.annotations_url, fetched / ANNOTATIONS_CSV)
    if params.md5sums_url:
        download(params.md5sums_url, fetched / MD5SUMS_TXT)
    return fetched


def check_mhist_counts(tiles: list[Tile], where: Path) -> None:
    """Checks MHIST's published counts (3,152 tiles; train 2,175, test 977).

    Raises:
        MhistSourceError: naming what differs; the message says how to skip the check.
    """
    counts = {"total": len(tiles), "train": len(partition(tiles, "train")), "test": len(partition(tiles, "test"))}
    if counts != MHIST_COUNTS:
        raise MhistSourceError(
            f"{where}: found {counts}, MHIST has {MHIST_COUNTS}; the files are incomplete or not MHIST "
            "(set data.mhist.check_counts: false to accept a subset)"
        )


def import_mhist(
    params: MhistSourceParams, target: Path, positive_label: str = "SSA", tile_size: int | None = None
) -> list[Tile]:
    """Fetches or reads MHIST, checks it, and writes it in MHIST's layout under ``target``.

    Args:
        params: ``data.mhist``.
        target: the dataset folder to fill (``images/``, ``annotations.csv``).
        positive_label: ``data.positive_label`` (MHIST: ``SSA``).
        tile_size: the expected tile side; MHIST's 224 when None.

    Returns:
        The tiles in the annotations' order.

    Raises:
        MhistSourceError: no source configured, a file missing or corrupt, an MD5 mismatch, an unsafe
            archive member, or counts that differ from MHIST's.
        LayoutError: bad annotations or tiles (missing column, unknown positive label, missing or
            undecodable image, wrong size).
    """
    if not (params.path or params.images_url or params.annotations_url):
        raise MhistSourceError(no_source_message())
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".mhist.", suffix=".tmp", dir=target.parent) as staging_name:
        staging = Path(staging_name)
        folder = _gather_files(params, staging)
        md5sums = folder / MD5SUMS_TXT
        if md5sums.is_file():
            LOGGER.info("MD5 verified: %s", ", ".join(verify_md5sums(folder, md5sums)))
        else:
            LOGGER.warning("no %s in %s: integrity not verified", MD5SUMS_TXT, folder)
        annotations = folder / ANNOTATIONS_CSV
        if not annotations.is_file():
            raise MhistSourceError(f"{annotations}: MHIST's {ANNOTATIONS_CSV} not found")
        tiles = read_annotations(annotations, positive_label)
        unexpected = sorted({tile.label for tile in tiles} - set(MHIST_LABELS))
        if unexpected:
            LOGGER.warning("%s: labels %s are not MHIST's %s", annotations, unexpected, list(MHIST_LABELS))
        if (folder / IMAGES_ZIP).is_file():
            archive = folder / IMAGES_ZIP
            extracted = staging / "extracted"
            extracted.mkdir()
            safe_extract(archive, extracted)
            dataset = staging / "dataset"
            dataset.mkdir()
            # check_tile_files and copy_dataset read ROOT/images: move the extracted folder there.
            _images_folder(extracted).rename(dataset / "images")
        elif (folder / "images").is_dir():
            archive, dataset = None, folder
        else:
            raise MhistSourceError(f"{folder}: neither {IMAGES_ZIP} nor an images/ folder found")
        try:
            check_tile_files(dataset, tiles, tile_size or MHIST_TILE_SIZE)
        except LayoutError as error:
            if archive is None:
                raise
            raise LayoutError(f"{error} (extracted from {archive})") from None
        if params.check_counts:
            check_mhist_counts(tiles, annotations)
        copy_dataset(dataset, target, tiles, with_masks=False)
    return tiles
