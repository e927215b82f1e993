"""Tests of weakseg.normal_tissue: the classifier's evidence maps and the normal-tissue share of positive tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from weakseg.cam_batches import estimate_from_folder
from weakseg.data.layout import Tile
from weakseg.errors import UserInputError
from weakseg.io import write_png
from weakseg.models import build_classifier
from weakseg.normal_tissue import (
    MIN_REFERENCE_TILES,
    class_evidence_maps,
    crop_evidence_maps,
    estimate_normal_tissue_fraction,
    mean_crop_evidence_maps,
    tissue_evidence,
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


def test_evidence_maps_refuse_a_classifier_without_a_one_logit_head() -> None:
    classifier = build_classifier("resnet18")
    head = classifier.fc
    assert isinstance(head, torch.nn.Linear)
    classifier.fc = torch.nn.Linear(head.in_features, 2)
    with pytest.raises(UserInputError, match="one-logit nn.Linear, got Linear"):
        class_evidence_maps(classifier, torch.randn(1, 3, 32, 32))
    with pytest.raises(UserInputError, match="got None"):
        class_evidence_maps(torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1)), torch.randn(1, 3, 32, 32))


class _MeanOfFirstChannel(torch.nn.Module):
    """A stand-in classifier whose logit is the mean of its input's first channel: lesion pixels are 1."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, :1].mean(dim=(2, 3))


def test_crop_evidence_covers_every_pixel_when_the_stride_does_not_divide_the_tile() -> None:
    images = torch.zeros(1, 3, 10, 10)
    images[0, 0, -1, -1] = 1.0  # the last pixel: only crops flush with the bottom right edge hold it
    maps = crop_evidence_maps(_MeanOfFirstChannel(), images, crop_size=4, stride=4)
    assert torch.isfinite(maps).all()
    assert maps[0, -1, -1] == 1 / 16 and maps[0, -1, 0] == 0.0


def test_crop_evidence_is_the_lowest_crop_logit_holding_each_pixel() -> None:
    images = torch.zeros(1, 3, 8, 8)
    images[0, 0, :2, :2] = 1.0  # a 2x2 lesion in the corner; only the corner crop holds it
    maps = crop_evidence_maps(_MeanOfFirstChannel(), images, crop_size=4, stride=2, batch_size=3)
    expected = torch.zeros(1, 8, 8)
    expected[0, :2, :2] = 4 / 16  # no crop without the lesion holds the corner pixels
    torch.testing.assert_close(maps, expected)
    # Next to the lesion, a whole-tile view would see it; the crop that clears the lesion says normal.
    assert maps[0, 2, 2] == 0.0


def test_crop_evidence_of_an_image_no_larger_than_the_crop_is_its_logit() -> None:
    images = torch.zeros(2, 3, 6, 6)
    images[1, 0, :3] = 1.0
    maps = crop_evidence_maps(_MeanOfFirstChannel(), images, crop_size=8)
    torch.testing.assert_close(maps, torch.tensor([0.0, 0.5])[:, None, None].expand(2, 6, 6))


def test_mean_crop_evidence_is_the_mean_crop_logit_holding_each_pixel() -> None:
    images = torch.zeros(1, 3, 8, 8)
    images[0, 0, :2, :2] = 1.0  # a 2x2 lesion in the corner; only the corner crop (of 9) holds it
    maps = mean_crop_evidence_maps(_MeanOfFirstChannel(), images, crop_size=4, stride=2, batch_size=5)
    expected = torch.zeros(1, 8, 8)
    expected[0, :2, :2] = 4 / 16  # held by the corner crop alone
    expected[0, 2:4, :2] = expected[0, :2, 2:4] = 4 / 16 / 2  # by it and one crop clear of the lesion
    expected[0, 2:4, 2:4] = 4 / 16 / 4  # by it and three clear crops
    torch.testing.assert_close(maps, expected)
    # The lowest crop logit (crop_evidence_maps) clears every pixel a lesion-free crop holds; the mean grades
    # them by how many of their crops hold lesion.
    lowest = crop_evidence_maps(_MeanOfFirstChannel(), images, crop_size=4, stride=2)
    assert (maps >= lowest).all() and lowest[0, 2, 2] == 0.0 < maps[0, 2, 2]


def test_mean_crop_evidence_of_an_image_no_larger_than_the_crop_is_its_logit() -> None:
    images = torch.zeros(2, 3, 6, 6)
    images[1, 0, :3] = 1.0
    maps = mean_crop_evidence_maps(_MeanOfFirstChannel(), images, crop_size=8)
    torch.testing.assert_close(maps, torch.tensor([0.0, 0.5])[:, None, None].expand(2, 6, 6))


def test_crop_evidence_recovers_the_normal_share_next_to_a_lesion() -> None:
    # Tile i's normal tissue scores i (its first channel), in both classes; a positive tile also holds a
    # lesion band over its top quarter. Every pixel lies within a crop's reach of the lesion, but crops
    # clear of it score the tile's normal level, so the lower half of the levels counts the three normal
    # quarters of a positive tile as below the negatives' median: 0.5 * 0.75 below the cut, share 0.75.
    levels = np.arange(MIN_REFERENCE_TILES, dtype=np.uint8)
    negatives = np.zeros((MIN_REFERENCE_TILES, 32, 32, 3), dtype=np.uint8)
    negatives[..., 0] = levels[:, None, None]
    positives = negatives.copy()
    positives[:, :8, :, 0] = 255
    tissue = np.ones((MIN_REFERENCE_TILES, 32, 32), dtype=bool)
    preprocessing = {"tile_size": 32, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "scale": 255.0}
    device = torch.device("cpu")
    classifier = _MeanOfFirstChannel()
    negative_values = tissue_evidence(classifier, negatives, tissue, device, preprocessing, crop_size=16)
    positive_values = tissue_evidence(classifier, positives, tissue, device, preprocessing, crop_size=16)
    estimate = estimate_normal_tissue_fraction(negative_values, positive_values)
    assert estimate.below_cut_fraction == pytest.approx(0.375)
    assert estimate.normal_tissue_fraction == pytest.approx(0.75)
    # Without crops, every pixel of a positive tile carries the lesion's share of the tile's mean.
    whole = tissue_evidence(classifier, positives, tissue, device, preprocessing, crop_size=32)
    assert min(values.min() for values in whole) > max(values.max() for values in negative_values)


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
    assert estimate.crop_size is None
    cropped = estimate_from_folder(classifier, tiles, tmp_path, torch.device("cpu"), batch_size=1, crop_size=32)
    assert cropped.crop_size == 32 and (cropped.positive_tiles, cropped.negative_tiles) == (2, 2)
