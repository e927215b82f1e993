"""Tests of the download stage (stages/download.py) run the way DVC runs it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from stages.download import run
from weakseg.data.layout import read_annotations
from weakseg.io import read_mask
from weakseg.stage import EXIT_USER_ERROR, run_stage

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: dict) -> Path:
    monkeypatch.chdir(tmp_path)
    shutil.copy(PROJECT_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": data}))
    return tmp_path


SMALL_SYNTHETIC = {"source": "synthetic", "synthetic": {"num_tiles": 10, "tile_size": 48, "seed": 1}}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_synthetic_default_writes_dataset_and_contact_sheet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _project(tmp_path, monkeypatch, SMALL_SYNTHETIC)
    assert run_stage("download", run, argv=[]) == 0
    tiles = read_annotations("data/raw/annotations.csv", "SSA")
    assert len(tiles) == 10
    assert len(list(Path("data/raw/images").glob("*.png"))) == 10
    assert len(list(Path("data/raw/masks").glob("*.png"))) == 10
    assert Path("figures/download/contact_sheet.png").stat().st_size > 10_000
    # Nothing temporary is left beside the outputs.
    assert sorted(path.name for path in Path("data").iterdir()) == ["raw"]
    assert sorted(path.name for path in Path("figures").iterdir()) == ["download"]
    first = _tree(Path("data/raw"))
    assert run_stage("download", run, argv=[]) == 0
    assert _tree(Path("data/raw")) == first


def test_bad_params_write_nothing_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _project(tmp_path, monkeypatch, {"source": "synthetic", "synthetic": {"num_tiles": -5}})
    assert run_stage("download", run, argv=[]) == EXIT_USER_ERROR
    assert "data.synthetic.num_tiles" in capsys.readouterr().err
    assert not Path("data").exists() and not Path("figures").exists()


def test_mhist_without_source_fails_plainly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _project(tmp_path, monkeypatch, {"source": "mhist"})
    assert run_stage("download", run, argv=[]) == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert "https://bmirds.github.io/MHIST/" in error and "data.mhist.path" in error
    assert "Traceback" not in error
    assert not Path("data/raw").exists()


def test_failure_keeps_previous_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _project(tmp_path, monkeypatch, SMALL_SYNTHETIC)
    assert run_stage("download", run, argv=[]) == 0
    before = _tree(Path("data/raw"))
    Path("params.yaml").write_text(yaml.safe_dump({"data": {"source": "folder", "folder": {"path": "missing"}}}))
    assert run_stage("download", run, argv=[]) == EXIT_USER_ERROR
    assert _tree(Path("data/raw")) == before
    assert sorted(path.name for path in Path("data").iterdir()) == ["raw"]


def test_synthetic_tile_size_conflict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _project(tmp_path, monkeypatch, {**SMALL_SYNTHETIC, "tile_size": 64})
    assert run_stage("download", run, argv=[]) == EXIT_USER_ERROR
    assert "data.tile_size" in capsys.readouterr().err


@pytest.mark.shared_data
def test_folder_source_on_shared_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_dataset: Path) -> None:
    data = {"source": "folder", "positive_label": "HGIN", "folder": {"path": str(shared_dataset)}}
    _project(tmp_path, monkeypatch, data)
    assert run_stage("download", run, argv=[]) == 0
    tiles = read_annotations("data/raw/annotations.csv", "HGIN")
    assert len(tiles) == 660
    assert sum(tile.positive for tile in tiles) == 186
    images = sorted(Path("data/raw/images").iterdir())
    masks = sorted(Path("data/raw/masks").iterdir())
    assert len(images) == len(masks) == 660
    assert not any(path.is_symlink() for path in images + masks)
    positive = next(tile for tile in tiles if tile.positive)
    assert read_mask(Path("data/raw/masks") / positive.name).any()
    assert Path("figures/download/contact_sheet.png").is_file()
