"""Tests of the MHIST source (weakseg/data/mhist.py) on a small fake archive in MHIST's format."""

from __future__ import annotations

import csv
import hashlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from weakseg.data import mhist
from weakseg.data.layout import LayoutError, read_annotations
from weakseg.data.mhist import MhistSourceError, import_mhist, parse_md5sums, safe_extract
from weakseg.params import MhistSourceParams

NAMES = ["MHIST_aaa.png", "MHIST_aab.png", "MHIST_aac.png", "MHIST_aad.png"]
LABELS = ["SSA", "HP", "HP", "SSA"]
PARTITIONS = ["train", "train", "test", "test"]
COLUMNS = ["Image Name", "Majority Vote Label", "Number of Annotators who Selected SSA (Out of 7)", "Partition"]


def _png_bytes(tmp: Path, seed: int, size: int = 224, mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    path = tmp / f"tile{seed}.png"
    Image.fromarray(pixels).convert(mode).save(path)
    return path.read_bytes()


def make_fake_mhist(
    folder: Path,
    *,
    md5: bool = True,
    columns: list[str] = COLUMNS,
    labels: list[str] = LABELS,
    member_overrides: dict[str, bytes] | None = None,
    skip: str | None = None,
    size: int = 224,
) -> Path:
    """Writes images.zip (members images/NAME.png), annotations.csv and optionally MD5SUMs.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / "scratch"
    scratch.mkdir()
    with zipfile.ZipFile(folder / "images.zip", "w") as archive:
        for index, name in enumerate(NAMES):
            if name == skip:
                continue
            archive.writestr(f"images/{name}", _png_bytes(scratch, index, size))
        for member, data in (member_overrides or {}).items():
            archive.writestr(member, data)
    with (folder / "annotations.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for name, label, partition in zip(NAMES, LABELS if labels is None else labels, PARTITIONS, strict=True):
            row = {"Image Name": name, "Majority Vote Label": label, "Partition": partition}
            row[COLUMNS[2]] = "6" if label == "SSA" else "1"
            writer.writerow([row.get(column, "") for column in columns])
    if md5:
        lines = [
            f"{hashlib.md5((folder / name).read_bytes()).hexdigest()}  {name}"
            for name in ("images.zip", "annotations.csv")
        ]
        (folder / "MD5SUMs.txt").write_text("\n".join(lines) + "\n")
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()
    return folder


def _params(**values: Any) -> MhistSourceParams:
    return MhistSourceParams(check_counts=False, **values)


@pytest.mark.parametrize("md5", [True, False])
def test_local_folder_with_and_without_md5(tmp_path: Path, md5: bool) -> None:
    source = make_fake_mhist(tmp_path / "download", md5=md5)
    target = tmp_path / "raw"
    tiles = import_mhist(_params(path=str(source)), target)
    assert [tile.name for tile in tiles] == NAMES
    assert [tile.positive for tile in tiles] == [True, False, False, True]
    assert [tile.annotators for tile in tiles] == [6, 1, 1, 6]
    assert sorted(path.name for path in (target / "images").iterdir()) == NAMES
    assert not (target / "masks").exists()
    assert read_annotations(target / "annotations.csv", "SSA") == tiles
    with zipfile.ZipFile(source / "images.zip") as archive:
        assert (target / "images" / NAMES[0]).read_bytes() == archive.read(f"images/{NAMES[0]}")
    # The staging folder is cleaned up.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["download", "raw"]


def test_wrong_md5_is_refused(tmp_path: Path) -> None:
    source = make_fake_mhist(tmp_path / "download")
    (source / "MD5SUMs.txt").write_text(f"{'0' * 32}  images.zip\n")
    with pytest.raises(MhistSourceError, match=r"images\.zip: MD5 .* does not match"):
        import_mhist(_params(path=str(source)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_malformed_md5_file_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "MD5SUMs.txt").write_text("not a hash line\n")
    with pytest.raises(MhistSourceError, match=r"MD5SUMs\.txt:1"):
        parse_md5sums(tmp_path / "MD5SUMs.txt")


def test_zip_bundle_and_file_urls(tmp_path: Path) -> None:
    source = make_fake_mhist(tmp_path / "download")
    bundle = tmp_path / "mhist.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        for name in ("images.zip", "annotations.csv", "MD5SUMs.txt"):
            archive.write(source / name, f"MHIST/{name}")
    from_zip = import_mhist(_params(path=str(bundle)), tmp_path / "from_zip")
    urls = {
        "images_url": (source / "images.zip").as_uri(),
        "annotations_url": (source / "annotations.csv").as_uri(),
        "md5sums_url": (source / "MD5SUMs.txt").as_uri(),
    }
    from_urls = import_mhist(_params(**urls), tmp_path / "from_urls")
    assert from_zip == from_urls
    assert len(list((tmp_path / "from_urls" / "images").iterdir())) == 4


def test_bad_url_names_it(tmp_path: Path) -> None:
    missing = (tmp_path / "nothing.zip").as_uri()
    params = _params(images_url=missing, annotations_url=missing)
    with pytest.raises(MhistSourceError, match="nothing.zip"):
        import_mhist(params, tmp_path / "raw")


def test_member_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    source = make_fake_mhist(tmp_path / "download", md5=False, member_overrides={"../../evil.png": b"x"})
    with pytest.raises(MhistSourceError, match=r"evil\.png.*outside"):
        import_mhist(_params(path=str(source)), tmp_path / "raw")
    assert not list(tmp_path.rglob("evil.png"))


def test_safe_extract_refuses_absolute_paths(tmp_path: Path) -> None:
    archive = tmp_path / "abs.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("/etc/evil.png", b"x")
    with pytest.raises(MhistSourceError, match="evil.png"):
        safe_extract(archive, tmp_path / "out")


def test_archive_with_too_many_members_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The member count is checked from the central directory: nothing is extracted."""
    monkeypatch.setattr(mhist, "MAX_ARCHIVE_MEMBERS", 3)  # the fake images.zip holds 4 tiles
    source = make_fake_mhist(tmp_path / "download", md5=False)
    with pytest.raises(MhistSourceError, match=r"images\.zip: holds 4 members, more than the 3 allowed"):
        import_mhist(_params(path=str(source)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    assert not list(tmp_path.rglob("MHIST_*.png"))


def test_archive_declaring_too_many_bytes_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mhist, "MAX_ARCHIVE_BYTES", 10_000)
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        for index in range(3):  # 12,000 bytes of zeros that compress to almost nothing
            handle.writestr(f"images/tile{index}.png", bytes(4_000))
    with pytest.raises(MhistSourceError, match=r"big\.zip: declares 12,000 bytes uncompressed, more than the 10,000"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_member_declaring_a_huge_size_is_refused_before_writing(tmp_path: Path) -> None:
    """A zip-bomb-like member: 16 real bytes, 4 GB declared in the central directory (real bounds)."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("images/bomb.png", b"x" * 16)
    data = bytearray(archive.read_bytes())
    central = data.index(b"PK\x01\x02")  # uncompressed size: 4 bytes at offset 24 of the header
    data[central + 24 : central + 28] = (0xFFFF_FFF0).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    assert zipfile.ZipFile(archive).infolist()[0].file_size > mhist.MAX_MEMBER_BYTES
    with pytest.raises(MhistSourceError, match=r"bomb\.zip: member 'images/bomb\.png' declares 4,294,967,280 bytes"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_png_names_the_file(tmp_path: Path) -> None:
    broken = {f"images/{NAMES[1]}": b"\x89PNG not really"}
    source = make_fake_mhist(tmp_path / "download", md5=False, skip=NAMES[1], member_overrides=broken)
    with pytest.raises(LayoutError, match=rf"{NAMES[1]}: cannot decode.*extracted from .*images\.zip"):
        import_mhist(_params(path=str(source)), tmp_path / "raw")


def test_missing_image_names_the_file(tmp_path: Path) -> None:
    source = make_fake_mhist(tmp_path / "download", md5=False, skip=NAMES[2])
    with pytest.raises(LayoutError, match=rf"{NAMES[2]}: listed in annotations.csv but missing"):
        import_mhist(_params(path=str(source)), tmp_path / "raw")


def test_missing_column_is_named(tmp_path: Path) -> None:
    columns = [column for column in COLUMNS if column != "Partition"]
    source = make_fake_mhist(tmp_path / "download", md5=False, columns=columns)
    with pytest.raises(LayoutError, match=r"missing column\(s\) \['Partition'\]"):
        import_mhist(_params(path=str(source)), tmp_path / "raw")


def test_positive_label_not_present(tmp_path: Path) -> None:
    source = make_fake_mhist(tmp_path / "download", md5=False)
    with pytest.raises(LayoutError, match="positive label 'HGIN' is not among the labels"):
        import_mhist(_params(path=str(source)), tmp_path / "raw", positive_label="HGIN")


def test_wrong_tile_size(tmp_path: Path) -> None:
    source = make_fake_mhist(tmp_path / "download", md5=False, size=200)
    with pytest.raises(LayoutError, match="size 200x200, expected 224x224"):
        import_mhist(_params(path=str(source)), tmp_path / "raw")


def test_counts_are_checked_unless_disabled(tmp_path: Path) -> None:
    source = make_fake_mhist(tmp_path / "download", md5=False)
    with pytest.raises(MhistSourceError, match="check_counts: false"):
        import_mhist(MhistSourceParams(path=str(source)), tmp_path / "raw")


def test_no_source_says_where_mhist_comes_from(tmp_path: Path) -> None:
    with pytest.raises(MhistSourceError) as raised:
        import_mhist(MhistSourceParams(), tmp_path / "raw")
    message = str(raised.value)
    assert "https://bmirds.github.io/MHIST/" in message
    assert "research-use form" in message and "data.mhist.path" in message


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(MhistSourceError, match="data.mhist.path: .*nowhere"):
        import_mhist(_params(path=str(tmp_path / "nowhere")), tmp_path / "raw")


def test_already_unzipped_folder(tmp_path: Path) -> None:
    source = make_fake_mhist(tmp_path / "download", md5=False)
    with zipfile.ZipFile(source / "images.zip") as archive:
        archive.extractall(source)
    (source / "images.zip").unlink()
    tiles = import_mhist(_params(path=str(source)), tmp_path / "raw")
    assert len(list((tmp_path / "raw" / "images").iterdir())) == len(tiles) == 4
