"""Tests of weakseg.normal_tissue: the classifier's evidence maps and the normal-tissue share of positive tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from weakseg.cam_batches import estimate_from_folder
from weakseg.data.layout import Tile
from weakseg.io import write_png
from weakseg.models import build_classifier
from weakseg.normal_tissue import (
    MIN_REFERENCE_TILES,
    class_evidence_maps,
    estimate_normal_tissue_fraction,
)


def test_evidence_map_averages_to_the_classifier_logit() -> None:
    torch.manual_seed(0)
    classifier = build_classifier("resnet18").eval()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        grid = class_evidence_maps(classifier, images, upsample=False)
        logits = classifier(images)[:, 0]
        upsampled = class_evidence_maps(classifier, images)
    assert grid.shape == (2, 3, 3) and upsampled.shape == (2, 96, 96)
    torch.testing.assert_close(grid.mean(dim=(1, 2)), logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(grid[0], grid[0].mean())  # a map, not a constant


def _tiles(values: np.ndarray, count: int = MIN_REFERENCE_TILES) -> list[np.ndarray]:
    return [values.copy() for _ in range(count)]


NORMAL = np.linspace(0.0, 1.0, 1000, endpoint=False)  # normal tissue's evidence, median 0.5


def test_normal_share_is_recovered_when_normal_tissue_scores_alike_in_both_classes() -> None:
    # Positive tiles: 40 % normal tissue (scored like the negatives), 60 % lesion (far above).
    positive = np.concatenate([np.linspace(0.0, 1.0, 400, endpoint=False), np.full(600, 5.0)])
    estimate = estimate_normal_tissue_fraction(_tiles(NORMAL), _tiles(positive), reference_quantile=0.5)
    assert estimate.reference_cut == pytest.approx(0.5, abs=1e-3)
    assert estimate.below_cut_fraction == pytest.approx(0.2, abs=1e-3)  # half the normal share
    assert estimate.normal_tissue_fraction == pytest.approx(0.4, abs=1e-3)
    upper = estimate_normal_tissue_fraction(_tiles(NORMAL), _tiles(positive), reference_quantile=0.75)
    assert upper.normal_tissue_fraction == pytest.approx(0.4, abs=1e-3)  # any cut, the same share


def test_no_share_where_the_class_shows_in_normal_tissue_too() -> None:
    # The positive tiles' normal tissue scores above every negative pixel (stain or context gives it away).
    positive = np.concatenate([np.linspace(2.0, 3.0, 400), np.full(600, 5.0)])
    estimate = estimate_normal_tissue_fraction(_tiles(NORMAL), _tiles(positive))
    assert estimate.normal_tissue_fraction == 0.0


def test_share_is_clipped_to_one() -> None:
    positive = np.full(1000, -1.0)  # below every negative: all normal, and below/quantile = 2
    assert estimate_normal_tissue_fraction(_tiles(NORMAL), _tiles(positive)).normal_tissue_fraction == 1.0


def test_too_few_tiles_of_a_class_give_no_estimate() -> None:
    positive = np.linspace(0.0, 1.0, 1000)
    few = estimate_normal_tissue_fraction(_tiles(NORMAL, MIN_REFERENCE_TILES - 1), _tiles(positive))
    assert few.normal_tissue_fraction == 0.0 and few.reference_cut is None
    assert few.negative_tiles == MIN_REFERENCE_TILES - 1 and few.positive_tiles == MIN_REFERENCE_TILES
    empty_tissue = _tiles(NORMAL) + [np.array([])]  # a tile without tissue does not count
    assert estimate_normal_tissue_fraction(empty_tissue, _tiles(positive)).negative_tiles == MIN_REFERENCE_TILES
    with pytest.raises(ValueError, match="reference_quantile"):
        estimate_normal_tissue_fraction(_tiles(NORMAL), _tiles(positive), reference_quantile=1.0)


def test_estimate_from_folder_reads_images_and_tissue_of_each_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = build_classifier("resnet18").eval()
    rng = np.random.default_rng(0)
    tiles = []
    for index in range(4):
        size = 64 if index % 2 else 96
        name = f"t{index}.png"
        write_png(tmp_path / "images" / name, rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        tissue = np.zeros((size, size), dtype=bool)
        tissue[: size // 2] = True
        write_png(tmp_path / "tissue" / name, tissue)
        tiles.append(Tile(name, "SSA" if index < 2 else "HP", "train", index < 2))
    estimate = estimate_from_folder(classifier, tiles, tmp_path, torch.device("cpu"), batch_size=1)
    assert (estimate.positive_tiles, estimate.negative_tiles) == (2, 2)
    assert estimate.normal_tissue_fraction == 0.0  # fewer than MIN_REFERENCE_TILES of a class
