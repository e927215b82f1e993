"""Tests of the refine_masks stage: outputs, truth metrics on hand-made masks, serial == parallel."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.recording import RecordingTracker, record_stage_run
from weakseg.data.layout import Tile, read_annotations, write_annotations
from weakseg.io import read_json, read_mask, write_png
from weakseg.stage import run_stage

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture
def tracker(monkeypatch: pytest.MonkeyPatch) -> RecordingTracker:
    """Replaces ``stage_run`` in the refine_masks stage with a recorder."""
    from stages import refine_masks

    return record_stage_run(monkeypatch, refine_masks, "refine_masks", "refine.crf.bilateral.srgb")


def _block_tile(column: int) -> tuple[np.ndarray, np.ndarray]:
    """An image with a purple block left of ``column`` on pink, and a CAM that is high on the block."""
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = (235, 200, 220)
    image[:, :column] = (150, 60, 150)
    cam = np.full((SIZE, SIZE), 40, dtype=np.uint8)
    cam[:, :column] = 220
    return image, cam


def write_project(root: Path, refine: dict[str, Any], with_truth: bool = True) -> list[Tile]:
    """Four tiles (two per partition, one positive each) with CAMs, tissue and truth, and params."""
    tiles = [
        Tile("p1.png", "SSA", "train", True),
        Tile("n1.png", "HP", "train", False),
        Tile("p2.png", "SSA", "test", True),
        Tile("n2.png", "HP", "test", False),
    ]
    truth_columns = {"p1.png": 12, "p2.png": 20}
    for tile in tiles:
        image, cam = _block_tile(12 if tile.name == "p1.png" else 20)
        write_png(root / "data/normalized/images" / tile.name, image)
        write_png(root / "data/normalized/tissue" / tile.name, np.ones((SIZE, SIZE), dtype=bool))
        write_png(root / "data/cams" / tile.name, cam)
        if with_truth:
            truth = np.zeros((SIZE, SIZE), dtype=bool)
            if tile.positive:
                truth[:, : truth_columns[tile.name]] = True
            write_png(root / "data/raw/masks" / tile.name, truth)
    write_annotations(root / "data/normalized/annotations.csv", tiles)
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump({"refine": refine}))
    return tiles


def run_refine() -> int:
    from stages import refine_masks

    return run_stage("refine_masks", refine_masks.run, argv=[])


SMALL = {"min_object_size": 16, "figure_tiles": 2, "workers": 1}


def test_stage_writes_masks_metrics_and_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: RecordingTracker
) -> None:
    monkeypatch.chdir(tmp_path)
    tiles = write_project(tmp_path, SMALL)
    assert run_refine() == 0
    masks = {tile.name: read_mask(tmp_path / "data/pseudo_masks" / tile.name) for tile in tiles}
    # A negative train tile's mask is empty by its label; a negative test tile is refined like any test tile
    # (the pipeline does not know its label; evaluate gates it by the classifier's decision).
    assert not masks["n1.png"].any()
    assert masks["n2.png"][:, :20].all() and not masks["n2.png"][:, 20:].any()
    # The CAM covers the block exactly and its colour edge agrees: the pseudo-mask is the block.
    assert masks["p1.png"][:, :12].all() and not masks["p1.png"][:, 12:].any()
    assert masks["p2.png"][:, :20].all() and not masks["p2.png"][:, 20:].any()
    report = read_json(tmp_path / "metrics/pseudo_masks.json")
    assert report["has_truth"] is True
    for partition in ("train", "test"):
        section = report[partition]
        assert section["positive_tiles"] == 1 and section["negative_tiles"] == 1
        assert section["coverage"]["negative_nonempty_tiles"] == (1 if partition == "test" else 0)
        assert set(section["vs_truth"]) == {"positive_tiles", "threshold", "morphology", "crf"}
        assert section["vs_truth"]["crf"]["iou"] == pytest.approx(1.0)
    assert report["train"]["coverage"]["positive"]["mean"] == pytest.approx(12 / 32)
    assert (tmp_path / "figures/refine_masks/contact_sheet.png").stat().st_size > 1000
    assert tracker.metrics["pseudo.train.vs_truth.crf.iou"] == pytest.approx(1.0)


def test_negative_train_tiles_need_no_cam(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: RecordingTracker
) -> None:
    """generate_cams skips negative train tiles; refine_masks must not read their (absent) CAMs."""
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, {**SMALL, "figure_tiles": 0})
    (tmp_path / "data/cams/n1.png").unlink()
    assert run_refine() == 0
    assert read_mask(tmp_path / "data/pseudo_masks/n1.png").shape == (SIZE, SIZE)
    assert not read_mask(tmp_path / "data/pseudo_masks/n1.png").any()


def test_truth_metrics_per_step_on_hand_made_masks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: RecordingTracker
) -> None:
    """A CAM with a speck: the threshold keeps it, morphology removes it; the scores show it."""
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, {**SMALL, "crf": {"enabled": False}, "threshold_quantile": 0.6})
    # p1: truth = columns 0..11 (384 px). Its CAM: block high, plus a 2x2 bright speck far right.
    cam = np.full((SIZE, SIZE), 40, dtype=np.uint8)
    cam[:, :12] = 220
    cam[20:22, 28:30] = 255
    write_png(tmp_path / "data/cams/p1.png", cam)
    assert run_refine() == 0
    scores = read_json(tmp_path / "metrics/pseudo_masks.json")["train"]["vs_truth"]
    # Threshold: 384 true + 4 false positives. Morphology (3x3 opening) drops the speck.
    assert scores["threshold"]["iou"] == pytest.approx(384 / 388)
    assert scores["threshold"]["dice"] == pytest.approx(2 * 384 / (2 * 384 + 4))
    assert scores["threshold"]["iou_positive_mean"] == pytest.approx(384 / 388)
    assert scores["morphology"]["iou"] == pytest.approx(1.0)
    assert "crf" not in scores


def test_without_truth_there_are_no_truth_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: RecordingTracker
) -> None:
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, SMALL, with_truth=False)
    assert run_refine() == 0
    report = read_json(tmp_path / "metrics/pseudo_masks.json")
    assert report["has_truth"] is False and "vs_truth" not in report["train"]
    assert len(list((tmp_path / "data/pseudo_masks").glob("*.png"))) == 4


def test_parallel_and_serial_runs_give_identical_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: RecordingTracker
) -> None:
    monkeypatch.chdir(tmp_path)
    tiles = write_project(tmp_path, {**SMALL, "workers": 1})
    # Less regular CAMs than the blocks, so the chain has real work to do.
    rng = np.random.default_rng(0)
    for tile in tiles:
        write_png(tmp_path / "data/cams" / tile.name, rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
    assert run_refine() == 0
    serial = {path.name: path.read_bytes() for path in (tmp_path / "data/pseudo_masks").iterdir()}
    serial_metrics = (tmp_path / "metrics/pseudo_masks.json").read_bytes()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"refine": {**SMALL, "workers": 2}}))
    assert run_refine() == 0
    parallel = {path.name: path.read_bytes() for path in (tmp_path / "data/pseudo_masks").iterdir()}
    assert parallel == serial and len(serial) == 4
    assert (tmp_path / "metrics/pseudo_masks.json").read_bytes() == serial_metrics
    assert tracker.metrics["pseudo.workers"] == 2


def test_missing_cam_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tracker: RecordingTracker
) -> None:
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, SMALL)
    (tmp_path / "data/cams/p2.png").unlink()
    assert run_refine() == 2
    assert "data/cams/p2.png" in capsys.readouterr().err
    assert not (tmp_path / "data/pseudo_masks").exists()


def test_stage_on_real_tiles(
    shared_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: RecordingTracker
) -> None:
    """A few real H&E tiles with a CAM made from their truth (blurred): the chain keeps most of the lesion."""
    from scipy.ndimage import gaussian_filter

    from weakseg.io import read_rgb

    positive_label = "HGIN"
    tiles = [tile for tile in read_annotations(shared_dataset / "annotations.csv", positive_label) if tile.positive]
    tiles = sorted(tiles, key=lambda tile: tile.name)[:2]
    monkeypatch.chdir(tmp_path)
    for tile in tiles:
        image = read_rgb(shared_dataset / "images" / tile.name)[:96, :96]
        truth = read_mask(shared_dataset / "masks" / tile.name)[:96, :96]
        write_png(tmp_path / "data/normalized/images" / tile.name, image)
        write_png(tmp_path / "data/normalized/tissue" / tile.name, np.ones(truth.shape, dtype=bool))
        cam = gaussian_filter(truth.astype(np.float64), sigma=4) + 0.01 * np.arange(96)[None, :] / 96
        write_png(tmp_path / "data/cams" / tile.name, (cam / cam.max() * 255).round().astype(np.uint8))
        write_png(tmp_path / "data/raw/masks" / tile.name, truth)
    negative = Tile("neg.png", "NOR", "test", False)
    write_png(tmp_path / "data/normalized/images/neg.png", np.full((96, 96, 3), 200, dtype=np.uint8))
    write_png(tmp_path / "data/normalized/tissue/neg.png", np.ones((96, 96), dtype=bool))
    write_png(tmp_path / "data/cams/neg.png", np.zeros((96, 96), dtype=np.uint8))
    write_png(tmp_path / "data/raw/masks/neg.png", np.zeros((96, 96), dtype=bool))
    write_annotations(tmp_path / "data/normalized/annotations.csv", [*tiles, negative])
    shutil.copy(PROJECT_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = {"data": {"positive_label": positive_label}, "refine": {"workers": 1, "figure_tiles": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_refine() == 0
    report = read_json(tmp_path / "metrics/pseudo_masks.json")
    assert report["train"]["positive_tiles"] + report["test"]["positive_tiles"] == len(tiles)
    assert not read_mask(tmp_path / "data/pseudo_masks/neg.png").any()


def test_figure_tiles_prefer_train_positives_then_one_negative() -> None:
    from weakseg.data.layout import pick_figure_tiles

    tiles = [Tile(f"p{index}.png", "SSA", "train", True) for index in range(9)]
    tiles += [
        Tile("q.png", "SSA", "test", True),
        Tile("n.png", "HP", "test", False),
        Tile("m.png", "HP", "train", False),
    ]
    chosen = [tile.name for tile in pick_figure_tiles(tiles, 3)]
    assert chosen == ["p0.png", "p4.png", "p8.png", "m.png"]
    assert pick_figure_tiles(tiles, 0) == []


def test_background_quantile_writes_the_ignored_band_as_128(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: RecordingTracker
) -> None:
    """p1's CAM: the lesion block (columns 0-11) at 220, then a ramp 48, 52, ..., 124 over columns 12-31.

    Over its 1024 tissue pixels the 0.625-quantile cut keeps exactly the block (37.5 %) and the 0.25-quantile
    cut (79) puts columns 12-19 (48..76) in the background: columns 20-31 are the ignored band.
    """
    from PIL import Image

    from weakseg.io import read_pseudo_mask

    monkeypatch.chdir(tmp_path)
    refine = {**SMALL, "crf": {"enabled": False}, "threshold_quantile": 0.625, "background_quantile": 0.25}
    write_project(tmp_path, refine)
    cam = np.full((SIZE, SIZE), 220, dtype=np.uint8)
    cam[:, 12:] = 4 * np.arange(12, SIZE, dtype=np.uint8)
    write_png(tmp_path / "data/cams/p1.png", cam)
    assert run_refine() == 0
    pixels = np.asarray(Image.open(tmp_path / "data/pseudo_masks/p1.png"))
    assert (pixels[:, :12] == 255).all() and (pixels[:, 12:20] == 0).all() and (pixels[:, 20:] == 128).all()
    assert not np.asarray(Image.open(tmp_path / "data/pseudo_masks/n1.png")).any()  # negative train: background
    foreground, ignore = read_pseudo_mask(tmp_path / "data/pseudo_masks/p1.png")
    assert foreground[:, :12].all() and not foreground[:, 12:].any() and ignore[:, 20:].all()
    report = read_json(tmp_path / "metrics/pseudo_masks.json")
    coverage = report["train"]["coverage"]
    assert coverage["positive_of_tissue"]["mean"] == pytest.approx(12 / 32)
    assert coverage["positive_ignored_of_tissue"]["mean"] == pytest.approx(12 / 32)
    # The band is not foreground when scored against the truth (columns 0-11).
    assert report["train"]["vs_truth"]["morphology"]["iou"] == pytest.approx(1.0)
    assert tracker.metrics["pseudo.train.coverage_ignored_of_tissue_mean"] == pytest.approx(12 / 32)
    # Without the band (the default), the same tile is two labels and the report has no ignored share.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"refine": {**refine, "background_quantile": None}}))
    assert run_refine() == 0
    pixels = np.asarray(Image.open(tmp_path / "data/pseudo_masks/p1.png"))
    assert (pixels[:, :12] == 255).all() and not pixels[:, 12:].any()
    assert "positive_ignored_of_tissue" not in read_json(tmp_path / "metrics/pseudo_masks.json")["train"]["coverage"]


def test_automatic_background_quantile_is_generate_cams_estimate_capped_at_the_foreground_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tracker: RecordingTracker
) -> None:
    """The same p1 as above: an estimate of 0.25 gives the 0.25-quantile's band, 0.9 is capped at 0.625."""
    from PIL import Image

    from weakseg.io import write_json

    monkeypatch.chdir(tmp_path)
    refine = {**SMALL, "crf": {"enabled": False}, "threshold_quantile": 0.625, "background_quantile": "auto"}
    write_project(tmp_path, refine)
    cam = np.full((SIZE, SIZE), 220, dtype=np.uint8)
    cam[:, 12:] = 4 * np.arange(12, SIZE, dtype=np.uint8)
    write_png(tmp_path / "data/cams/p1.png", cam)
    assert run_refine() == 2  # no estimate yet: a clear error, and no half-written masks
    assert "metrics/cams.json" in capsys.readouterr().err
    assert not (tmp_path / "data/pseudo_masks").exists()
    write_json(tmp_path / "metrics/cams.json", {"normal_tissue_fraction": 0.25})
    assert run_refine() == 0
    pixels = np.asarray(Image.open(tmp_path / "data/pseudo_masks/p1.png"))
    assert (pixels[:, :12] == 255).all() and (pixels[:, 12:20] == 0).all() and (pixels[:, 20:] == 128).all()
    assert read_json(tmp_path / "metrics/pseudo_masks.json")["background_quantile"] == 0.25
    assert tracker.metrics["pseudo.background_quantile"] == 0.25
    write_json(tmp_path / "metrics/cams.json", {"normal_tissue_fraction": 0.9})
    assert run_refine() == 0
    pixels = np.asarray(Image.open(tmp_path / "data/pseudo_masks/p1.png"))
    assert (pixels[:, :12] == 255).all() and not pixels[:, 12:].any()  # capped: no band left
    assert read_json(tmp_path / "metrics/pseudo_masks.json")["background_quantile"] == 0.625


def test_automatic_threshold_quantile_puts_the_foreground_above_the_seeds_and_the_band(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: RecordingTracker
) -> None:
    """The same p1: an estimate of 0.25 and a band of 0.25 put the foreground's cut at the 0.5-quantile."""
    from PIL import Image

    from weakseg.io import write_json

    monkeypatch.chdir(tmp_path)
    refine = {
        **SMALL,
        "crf": {"enabled": False},
        "threshold_quantile": "auto",
        "ignore_band_width": 0.25,
        "background_quantile": "auto",
    }
    write_project(tmp_path, refine)
    cam = np.full((SIZE, SIZE), 220, dtype=np.uint8)
    cam[:, 12:] = 4 * np.arange(12, SIZE, dtype=np.uint8)
    write_png(tmp_path / "data/cams/p1.png", cam)
    write_json(tmp_path / "metrics/cams.json", {"normal_tissue_fraction": 0.25})
    assert run_refine() == 0
    pixels = np.asarray(Image.open(tmp_path / "data/pseudo_masks/p1.png"))
    # Quantiles over the 32 columns: the lowest 8 (columns 12-19) are seeds, the next 8 the band, the top
    # half (the 12 columns at 220 and columns 28-31) the foreground.
    assert (pixels[:, :12] == 255).all() and (pixels[:, 28:] == 255).all()
    assert (pixels[:, 12:20] == 0).all() and (pixels[:, 20:28] == 128).all()
    report = read_json(tmp_path / "metrics/pseudo_masks.json")
    assert (report["background_quantile"], report["threshold_quantile"]) == (0.25, 0.5)
    assert tracker.metrics["pseudo.threshold_quantile"] == 0.5
    # A share so large that seeds and band reach past the whole tissue leaves no foreground cut above 1.
    write_json(tmp_path / "metrics/cams.json", {"normal_tissue_fraction": 0.9})
    assert run_refine() == 0
    assert read_json(tmp_path / "metrics/pseudo_masks.json")["threshold_quantile"] == 1.0
