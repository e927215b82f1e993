"""Tests of weakseg.cam_batches: which tiles get a CAM, their batches and seeds, and the written tally."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_cam import RedVersusBlue, red_and_blue_tile
from weakseg.cam import cam_to_uint8, compute_cams
from weakseg.cam_batches import (
    CamTally,
    batch_cams,
    batch_plan,
    batch_seed,
    evidence_crop_size,
    same_size_batches,
    tiles_needing_cams,
)
from weakseg.data.layout import Tile
from weakseg.errors import UserInputError
from weakseg.io import ImageReadError, read_gray, write_png
from weakseg.params import CamParams


def test_cams_skip_negative_train_tiles_but_the_figures_one() -> None:
    tiles = [
        Tile("p.png", "SSA", "train", True),
        Tile("n2.png", "HP", "train", False),
        Tile("n1.png", "HP", "train", False),  # first negative train tile by name: refine_masks' figure shows it
        Tile("t_neg.png", "HP", "test", False),
        Tile("t_pos.png", "SSA", "test", True),
    ]
    assert [tile.name for tile in tiles_needing_cams(tiles, negative_train_tiles=False)] == [
        "p.png",
        "n1.png",
        "t_neg.png",
        "t_pos.png",
    ]
    assert tiles_needing_cams(tiles, negative_train_tiles=True) == tiles


def test_an_unreadable_tile_gets_a_batch_of_its_own_in_the_plan(tmp_path: Path) -> None:
    tiles = [Tile(f"t{index}.png", "SSA", "train", True) for index in range(4)]
    for index in (0, 1, 3):
        write_png(tmp_path / f"t{index}.png", np.zeros((8, 8, 3), dtype=np.uint8))
    (tmp_path / "t2.png").write_bytes(b"not a png")  # read_rgb names it when its batch is decoded
    assert batch_plan(tiles, tmp_path, 4) == [[0, 1], [2], [3]]
    with pytest.raises(ImageReadError, match="t2.png"):
        list(same_size_batches(tiles, tmp_path, 4))


def test_batch_seeds_differ_per_batch_and_per_run_seed() -> None:
    assert batch_seed(5, 0) == 5 * 1_000_003
    assert len({batch_seed(seed, index) for seed in (0, 1) for index in range(3)}) == 6


def test_batch_cams_ask_for_the_positive_class_and_encode_each_tile() -> None:
    model = RedVersusBlue().eval()
    images = np.stack([red_and_blue_tile(), red_and_blue_tile()])
    tiles = [Tile("neg.png", "HP", "train", False), Tile("pos.png", "SSA", "train", True)]
    settings = CamParams(method="gradcam", target_layer="layer4", batch_size=2)
    encoded = batch_cams(model, tiles, images, settings, seed=3, device=torch.device("cpu"), preprocessing=None)
    expected = compute_cams(model, images, [True, True], method="gradcam", target_layer="layer4", seed=3)
    assert [name for name, *_ in encoded] == ["neg.png", "pos.png"]
    for (_, heatmap, mean_activation, is_flat), cam in zip(encoded, expected, strict=True):
        np.testing.assert_array_equal(heatmap, cam_to_uint8(cam))  # the negative tile too: positive evidence
        assert mean_activation == float(cam.mean()) and is_flat == 0


def test_crop_evidence_cams_put_the_red_patch_on_top_and_need_a_crop_size() -> None:
    model = RedVersusBlue().eval()
    images = np.stack([red_and_blue_tile()])
    tiles = [Tile("pos.png", "SSA", "train", True)]
    settings = CamParams(method="crop_evidence", batch_size=2)
    encoded = batch_cams(model, tiles, images, settings, 0, torch.device("cpu"), None, classifier_crop_size=16)
    ((_, heatmap, mean_activation, is_flat),) = encoded
    assert heatmap.shape == images.shape[1:3] and heatmap.max() == 255 and heatmap.min() == 0 and is_flat == 0
    # Crops of 8 pixels (half the classifier's 16): the red patch scores highest, the blue one lowest.
    assert heatmap[2:12, 2:12].mean() > heatmap[12:20, 12:20].mean() > heatmap[20:30, 20:30].mean()
    assert mean_activation == pytest.approx(heatmap.mean() / 255, abs=1 / 255)
    assert evidence_crop_size(settings, 16) == 8
    assert evidence_crop_size(CamParams(method="crop_evidence", evidence_crop_size=12), None) == 12
    with pytest.raises(UserInputError, match="cam.evidence_crop_size, or classifier.crop_size"):
        batch_cams(model, tiles, images, settings, 0, torch.device("cpu"), None)


def test_tally_writes_counts_and_warns_about_flat_cams(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tally = CamTally()
    bright = np.full((4, 4), 255, dtype=np.uint8)
    tally.write(tmp_path, [("a.png", bright, 1.0, 0), ("b.png", np.zeros((4, 4), dtype=np.uint8), 0.0, 1)])
    tally.write(tmp_path, [("c.png", bright, 0.5, 0)])
    np.testing.assert_array_equal(read_gray(tmp_path / "a.png"), bright)
    with caplog.at_level(logging.WARNING):
        metrics = tally.report(3, "layer4")
    assert metrics == {"cam.tiles": 3, "cam.flat_tiles": 1, "cam.mean_activation": 0.5}
    assert "1 of 3 CAMs are flat" in caplog.text and "layer4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        CamTally(coverage=[0.2]).report(1, "layer4")
    assert "flat" not in caplog.text
