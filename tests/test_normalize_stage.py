"""Tests of the normalize stage on tiny hand-made datasets in MHIST layout (and a slice of the shared set)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.normalize import run
from tests.conftest import PROJECT_ROOT
from tests.test_stain import STAINS_A, STAINS_POISON, concentration_fields, render, unit
from weakseg.io import read_json, read_mask, read_rgb, write_png
from weakseg.stage import EXIT_USER_ERROR, run_stage
from weakseg.stain import load_normalize_settings, load_stain_reference
from weakseg.tissue import tissue_mask

TILE = 48


def write_params(folder: Path, **normalize: object) -> None:
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["normalize"].update({"workers": 1, "figure_tiles": 1, **normalize})
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copyfile(PROJECT_ROOT / "dvc.yaml", folder / "dvc.yaml")


def write_annotations(path: Path, rows: list[tuple[str, str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Name", "Majority Vote Label", "Partition"])
        writer.writerows(rows)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One store for this module's stage runs: creating a SQLite store's tables costs seconds each time."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-normalize')}/mlflow.db"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str) -> Path:
    """data/raw with train tiles stained like A (one all white), and test tiles in a poisonous stain."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "data" / "raw" / "images"
    images.mkdir(parents=True)
    rows = []
    for index in range(6):
        hematoxylin, eosin, _ = concentration_fields(TILE, seed=100 + index)
        label = "SSA" if index % 2 else "HP"
        tile = render(hematoxylin, eosin, STAINS_A, seed=index, strength=0.8 + 0.1 * index)
        write_png(images / f"train_{index}.png", tile)
        rows.append((f"train_{index}.png", label, "train"))
        if index < 4:
            write_png(images / f"test_{index}.png", render(hematoxylin, eosin, STAINS_POISON, seed=index))
            rows.append((f"test_{index}.png", label, "test"))
    write_png(images / "white.png", np.full((TILE, TILE, 3), 250, np.uint8))
    rows.append(("white.png", "HP", "train"))
    write_annotations(tmp_path / "data" / "raw" / "annotations.csv", rows)
    return tmp_path


def output_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_stage_writes_its_outputs_and_fits_on_train_tiles_only(project: Path) -> None:
    write_params(project, workers=2)
    assert run_stage("normalize", run, argv=[]) == 0
    normalized = project / "data" / "normalized"
    names = [f"train_{index}.png" for index in range(6)] + [f"test_{index}.png" for index in range(4)] + ["white.png"]
    for name in names:
        assert read_rgb(normalized / "images" / name).shape == (TILE, TILE, 3)
        assert set(np.unique(np.asarray(read_rgb(normalized / "tissue" / name)))) <= {0, 255}
    assert (normalized / "annotations.csv").read_bytes() == (project / "data/raw/annotations.csv").read_bytes()
    reference = read_json(normalized / "stain_reference.json")
    assert not any(name.startswith("test_") for name in reference["fitted_on"] + reference["skipped"])
    assert reference["skipped"] == ["white.png"] and len(reference["fitted_on"]) == 6
    # Test tiles, stained with something nothing like H&E, would have pulled the reference away from A.
    loaded = load_stain_reference(normalized / "stain_reference.json")
    assert loaded is not None
    assert np.all(np.sum(loaded.stain_matrix * unit(STAINS_A), axis=0) > 0.98)
    # predict can redo the masks from what the reference file records.
    settings = load_normalize_settings(normalized / "stain_reference.json")
    raw_tile = read_rgb(project / "data/raw/images/train_1.png")
    assert np.array_equal(tissue_mask(raw_tile, **settings["tissue"]), read_mask(normalized / "tissue/train_1.png"))
    metrics = read_json(project / "metrics" / "normalize.json")
    assert metrics["tiles"] == 11 and metrics["degenerate"]["tiles"] == ["white.png"]
    assert metrics["normalized"] == 10
    white = read_rgb(project / "data/raw/images/white.png")
    assert np.array_equal(read_rgb(normalized / "images" / "white.png"), white)
    assert not read_mask(normalized / "tissue" / "white.png").any()
    assert (project / "figures" / "normalize" / "before_after.png").stat().st_size > 1000
    # Deterministic: the same bytes again, on one process instead of a pool.
    first = output_bytes(normalized)
    write_params(project, workers=1, figure_tiles=0)
    assert run_stage("normalize", run, argv=[]) == 0
    assert output_bytes(project / "data" / "normalized") == first


def test_method_none_passes_tiles_through_and_still_writes_masks(project: Path) -> None:
    write_params(project, method="none", figure_tiles=0)
    assert run_stage("normalize", run, argv=[]) == 0
    normalized = project / "data" / "normalized"
    for path in sorted((project / "data/raw/images").iterdir()):
        assert np.array_equal(read_rgb(normalized / "images" / path.name), read_rgb(path))
        assert (normalized / "tissue" / path.name).is_file()
    assert load_stain_reference(normalized / "stain_reference.json") is None
    metrics = read_json(project / "metrics" / "normalize.json")
    assert metrics["normalized"] == 0 and metrics["degenerate"]["count"] == 0


def test_reference_tile_parameter(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_params(project, reference="data/raw/images/train_2.png", figure_tiles=0)
    assert run_stage("normalize", run, argv=[]) == 0
    reference = read_json(project / "data" / "normalized" / "stain_reference.json")
    assert reference["fitted_on"] == ["data/raw/images/train_2.png"]
    write_params(project, reference="nowhere.png")
    assert run_stage("normalize", run, argv=[]) == EXIT_USER_ERROR
    assert "normalize.reference" in capsys.readouterr().err


def test_shared_data_spread_of_optical_density_shrinks(
    shared_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
) -> None:
    """A seeded slice of the real tiles, linked (not copied) into a temporary data/raw."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    with (shared_dataset / "annotations.csv").open(newline="") as handle:
        rows = [(row["Image Name"], row["Majority Vote Label"], row["Partition"]) for row in csv.DictReader(handle)]
    chosen = sorted(np.random.default_rng(0).choice(len(rows), size=60, replace=False).tolist())
    rows = [rows[index] for index in chosen]
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "data" / "raw"
    (raw / "images").mkdir(parents=True)
    for name, _, _ in rows:
        (raw / "images" / name).symlink_to(shared_dataset / "images" / name)
    write_annotations(raw / "annotations.csv", rows)
    write_params(tmp_path, fit_tiles=16, figure_tiles=0)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["data"]["positive_label"] = "HGIN"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage("normalize", run, argv=[]) == 0
    metrics = read_json(tmp_path / "metrics" / "normalize.json")
    density = metrics["optical_density"]
    assert density["mean_std_after"] < 0.9 * density["mean_std_before"], density
    assert metrics["degenerate"]["count"] == 0
