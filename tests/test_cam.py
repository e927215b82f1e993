"""Tests of weakseg.cam and the generate_cams stage: CAMs peak where the logit looks, methods by name."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from tests.recording import RecordingTracker, record_stage_run
from weakseg.cam import (
    CAM_METHODS,
    CamMethodError,
    build_cam_extractor,
    cam_from_uint8,
    cam_to_uint8,
    compute_cams,
    dihedral_mean,
)
from weakseg.data.layout import Tile, write_annotations
from weakseg.io import read_gray, read_json, read_rgb, write_png
from weakseg.models import build_classifier, save_checkpoint
from weakseg.stage import run_stage
from weakseg.training.common import preprocessing_record

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tracker(monkeypatch: pytest.MonkeyPatch) -> RecordingTracker:
    """Replaces ``stage_run`` in the generate_cams stage with a recorder."""
    from stages import generate_cams

    return record_stage_run(monkeypatch, generate_cams, "generate_cams", "cam.method")


SIZE = 32
STAGE_SIZE = 64  # ResNet-18's layer4 is 2x2 at 64 px, so the CAM has structure


class RedVersusBlue(nn.Module):
    """A hand-built 'classifier': ``layer4`` has a red detector and a blue detector (1x1 convs + ReLU).

    The logit is the mean red response minus the mean blue response (scaled, so that Score-CAM's
    softmax over channel scores is decisive), so the positive class looks only at
    the red patch and the negative class (negated logit) only at the blue one.
    """

    def __init__(self) -> None:
        super().__init__()
        convolution = nn.Conv2d(3, 2, kernel_size=1, bias=False)
        with torch.no_grad():
            convolution.weight.copy_(torch.tensor([[1.0, -0.5, -0.5], [-0.5, -0.5, 1.0]]).view(2, 3, 1, 1))
        self.layer4 = nn.Sequential(nn.AvgPool2d(4), convolution, nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[10.0, -10.0]]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layer4(images)).flatten(1))


def red_and_blue_tile() -> np.ndarray:
    """Grey tile with a red patch top-left and a blue patch bottom-right."""
    tile = np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)
    tile[2:12, 2:12] = (230, 30, 30)
    tile[20:30, 20:30] = (30, 30, 230)
    return tile


def _quadrant_means(cam: np.ndarray) -> tuple[float, float]:
    half = SIZE // 2
    return float(cam[:half, :half].mean()), float(cam[half:, half:].mean())


@pytest.mark.parametrize("method", CAM_METHODS)
def test_cam_peaks_where_the_class_score_looks(method: str) -> None:
    model = RedVersusBlue().eval()
    tiles = np.stack([red_and_blue_tile(), red_and_blue_tile()])
    cams = compute_cams(model, tiles, [True, False], method=method, target_layer="layer4", seed=0, num_samples=2)
    assert cams.shape == (2, SIZE, SIZE)
    assert cams.dtype == np.float32
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    red, blue = _quadrant_means(cams[0])
    assert red > blue + 0.3, f"{method}: positive CAM should sit on the red patch (red {red:.2f}, blue {blue:.2f})"
    red, blue = _quadrant_means(cams[1])
    assert blue > red + 0.3, f"{method}: negative CAM should sit on the blue patch (red {red:.2f}, blue {blue:.2f})"


def test_methods_are_selected_by_name() -> None:
    model = RedVersusBlue().eval()
    names = {method: type(build_cam_extractor(model, method, "layer4")).__name__ for method in CAM_METHODS}
    assert names == {
        "smoothgradcampp": "SmoothGradCAMpp",
        "gradcam": "GradCAM",
        "gradcampp": "GradCAMpp",
        "scorecam": "ScoreCAM",
        "layercam": "LayerCAM",
    }


def test_unknown_method_and_layer_are_clear_errors() -> None:
    model = RedVersusBlue().eval()
    with pytest.raises(CamMethodError, match="cam.method 'gradcamxx'.*smoothgradcampp"):
        compute_cams(model, red_and_blue_tile()[None], [True], method="gradcamxx")
    with pytest.raises(CamMethodError, match="cam.target_layer 'layer9'.*layer4"):
        compute_cams(model, red_and_blue_tile()[None], [True], target_layer="layer9")


def test_smoothgrad_noise_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(0)
    model = build_classifier("resnet18").eval()
    # 64 px: ResNet-18's layer4 is 2x2 here (at 32 px it is 1x1, and every CAM is flat).
    tiles = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    before = torch.get_rng_state()
    first = compute_cams(model, tiles, [True, False], num_samples=2, std=0.5, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    again = compute_cams(model, tiles, [True, False], num_samples=2, std=0.5, seed=7)
    other = compute_cams(model, tiles, [True, False], num_samples=2, std=0.5, seed=8)
    np.testing.assert_array_equal(first, again)
    assert first.max() == 1.0
    assert not np.array_equal(first, other)


def test_uint8_round_trip() -> None:
    values = np.linspace(0.0, 1.0, 256, dtype=np.float32).reshape(16, 16)
    pixels = cam_to_uint8(values)
    assert pixels.dtype == np.uint8 and pixels.min() == 0 and pixels.max() == 255
    np.testing.assert_allclose(cam_from_uint8(pixels), values, atol=0.5 / 255 + 1e-6)


def _write_tiny_project(root: Path, positive_label: str = "SSA") -> list[Tile]:
    (root / "models").mkdir()
    torch.manual_seed(0)
    model = build_classifier("resnet18")
    save_checkpoint(
        root / "models" / "classifier.pt",
        kind="classifier",
        arch="resnet18",
        model=model,
        preprocessing=preprocessing_record(STAGE_SIZE),
        positive_label=positive_label,
        negative_label="HP",
    )
    rng = np.random.default_rng(3)
    tiles = [
        Tile("a.png", "SSA", "train", True),
        Tile("b.png", "HP", "train", False),
        Tile("c.png", "SSA", "test", True),
    ]
    for tile in tiles:
        image = rng.integers(0, 256, (STAGE_SIZE, STAGE_SIZE, 3), dtype=np.uint8)
        write_png(root / "data/normalized/images" / tile.name, image)
    write_annotations(root / "data/normalized/annotations.csv", tiles)
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    params = {
        "seed": 5,
        "cam": {"method": "smoothgradcampp", "num_samples": 2, "batch_size": 2, "device": "cpu"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return tiles


def test_generate_cams_stage_writes_one_reproducible_heatmap_per_tile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: RecordingTracker
) -> None:
    from stages import generate_cams

    monkeypatch.chdir(tmp_path)
    tiles = _write_tiny_project(tmp_path)
    assert run_stage("generate_cams", generate_cams.run, argv=[]) == 0
    assert tracker.metrics["cam.tiles"] == 3 and tracker.metrics["cam.flat_tiles"] == 0
    # Three tiles make no validation split: no normal-tissue estimate, so no background seeds.
    estimate = read_json(tmp_path / "metrics/cams.json")
    assert estimate["normal_tissue_fraction"] == 0.0 and estimate["reference_cut"] is None
    assert tracker.metrics["cam.normal_tissue_fraction"] == 0.0
    first = {tile.name: read_gray(tmp_path / "data/cams" / tile.name) for tile in tiles}
    assert sorted(path.name for path in (tmp_path / "data/cams").iterdir()) == ["a.png", "b.png", "c.png"]
    for cam in first.values():
        assert cam.shape == (STAGE_SIZE, STAGE_SIZE) and cam.dtype == np.uint8
        assert cam.max() == 255  # scaled to 0..1 per tile
    assert run_stage("generate_cams", generate_cams.run, argv=[]) == 0
    for tile in tiles:
        np.testing.assert_array_equal(read_gray(tmp_path / "data/cams" / tile.name), first[tile.name])


def test_generate_cams_stage_slides_a_crop_classifier_at_half_its_crop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: RecordingTracker
) -> None:
    from stages import generate_cams
    from weakseg.cam_batches import crop_evidence_cams
    from weakseg.models import load_checkpoint, model_from_checkpoint

    monkeypatch.chdir(tmp_path)
    tiles = _write_tiny_project(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["cam"]["method"] = "crop_evidence"
    params["classifier"] = {"crop_size": 32}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage("generate_cams", generate_cams.run, argv=[]) == 0
    checkpoint = load_checkpoint(tmp_path / "models/classifier.pt", kind="classifier")
    model = model_from_checkpoint(checkpoint)
    for tile in tiles:
        image = read_rgb(tmp_path / "data/normalized/images" / tile.name)
        expected = crop_evidence_cams(model, image[None], 16, torch.device("cpu"), checkpoint["preprocessing"])[0]
        np.testing.assert_array_equal(read_gray(tmp_path / "data/cams" / tile.name), cam_to_uint8(expected))


def test_generate_cams_refuses_a_classifier_of_another_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tracker: RecordingTracker
) -> None:
    monkeypatch.chdir(tmp_path)
    _write_tiny_project(tmp_path, positive_label="HGIN")
    from stages import generate_cams

    assert run_stage("generate_cams", generate_cams.run, argv=[]) == 2
    assert "classifier.pt" in capsys.readouterr().err
    assert not (tmp_path / "data/cams").exists()


def test_generate_cams_asks_every_tile_for_the_positive_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: RecordingTracker
) -> None:
    """Test tiles' labels are unknown at test time: their CAMs show the positive class whatever the label."""
    from stages import generate_cams
    from weakseg import cam_batches

    monkeypatch.chdir(tmp_path)
    tiles = _write_tiny_project(tmp_path)
    tiles.append(Tile("d.png", "HP", "test", False))
    write_png(tmp_path / "data/normalized/images/d.png", np.zeros((STAGE_SIZE, STAGE_SIZE, 3), dtype=np.uint8))
    write_annotations(tmp_path / "data/normalized/annotations.csv", tiles)
    asked: list[bool] = []
    real = cam_batches.compute_cams

    def recording(model: nn.Module, images: np.ndarray, positives: Sequence[bool], **options: Any) -> np.ndarray:
        asked.extend(positives)
        return real(model, images, positives, **options)

    monkeypatch.setattr(cam_batches, "compute_cams", recording)
    assert run_stage("generate_cams", generate_cams.run, argv=[]) == 0
    assert len(asked) == 4 and all(asked)


def test_dihedral_mean_keeps_an_equivariant_map_and_cancels_an_orientation_bias() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
    calls: list[tuple[int, ...]] = []

    def red(views: np.ndarray) -> np.ndarray:
        calls.append(views.shape)
        return views[..., 0].astype(np.float32)  # follows the tile wherever it turns

    expected = images[..., 0].astype(np.float32)
    expected = (expected - expected.min(axis=(1, 2), keepdims=True)) / np.ptp(expected, axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(dihedral_mean(red, images), expected, atol=1e-6)
    assert len(calls) == 8
    oblong = rng.integers(0, 256, (1, 4, 7, 3), dtype=np.uint8)
    assert dihedral_mean(red, oblong).shape == (1, 4, 7)

    def left_to_right(views: np.ndarray) -> np.ndarray:
        ramp = np.arange(views.shape[2], dtype=np.float32)  # brightest on the right of every view
        return np.broadcast_to(ramp, views.shape[:3]).copy()

    # Averaged over the eight views, "the right side" is every side: nothing is left of the bias.
    np.testing.assert_array_equal(dihedral_mean(left_to_right, images), np.zeros((3, 6, 6), dtype=np.float32))
