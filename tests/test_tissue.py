"""Tests of weakseg.tissue: tissue masks on synthetic H&E tiles, and colour measurements."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_stain import IO, STAINS_A, STAINS_B, concentration_fields, render
from weakseg.tissue import (
    check_rgb,
    colour_features,
    colour_separability_auc,
    mean_optical_density,
    optical_density,
    tissue_mask,
)


@pytest.fixture(scope="module")
def tissue() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return concentration_fields(96, seed=3)


# ------------------------------------------------------------------------------------- tissue masks
def test_tissue_mask_finds_the_lumen(tissue) -> None:
    hematoxylin, eosin, stained = tissue
    mask = tissue_mask(render(hematoxylin, eosin, STAINS_B, seed=2), min_object_size=16, min_hole_size=16)
    assert mask.dtype == bool and mask.shape == stained.shape
    assert (mask & stained).sum() / (mask | stained).sum() > 0.95


def test_tissue_mask_leaves_out_tinted_glass(tissue) -> None:
    hematoxylin, eosin, stained = tissue
    tile = render(hematoxylin, eosin, STAINS_A, seed=2)
    tile[~stained] = (184, 189, 157)  # yellow-grey glass, as dark as pale stroma
    assert tissue_mask(tile, 16, 16, min_green_excess=None)[~stained].mean() > 0.9  # density alone fails
    mask = tissue_mask(tile, 16, 16)
    assert (mask & stained).sum() / (mask | stained).sum() > 0.95


def test_tissue_mask_does_not_split_a_tile_without_background(tissue) -> None:
    hematoxylin, eosin, _ = tissue
    full = render(np.maximum(hematoxylin, 0.1), np.maximum(eosin, 0.3), STAINS_A, seed=0)
    assert tissue_mask(full, 16, 16).mean() > 0.99  # Otsu alone would cut nuclei from stroma


def test_tissue_mask_cleans_small_objects_and_holes() -> None:
    tile = np.full((40, 40, 3), 250, np.uint8)
    tile[5:25, 5:25] = (120, 60, 140)  # tissue, with a small hole
    tile[12:14, 12:14] = 250
    tile[32:34, 32:34] = (120, 60, 140)  # a speck
    mask = tissue_mask(tile, min_object_size=10, min_hole_size=10)
    assert mask[5:25, 5:25].all() and not mask[30:, 30:].any()
    raw = tissue_mask(tile, min_object_size=0, min_hole_size=0)
    assert raw[32, 32] and not raw[12, 12]
    assert not tissue_mask(np.full((8, 8, 3), 255, np.uint8), 0, 0).any()


# --------------------------------------------------------------------------------- measurements
def test_measurements(tissue: tuple[np.ndarray, np.ndarray, np.ndarray], rng: np.random.Generator) -> None:
    tile = render(*tissue[:2], STAINS_A, seed=0)
    direct = -np.log((tile.reshape(-1, 3).astype(float) + 1) / IO).mean(axis=0)
    np.testing.assert_allclose(mean_optical_density(tile), direct, rtol=1e-10)
    features = colour_features(tile)
    assert features.shape == (27,) and np.allclose(features[:24].reshape(3, 8).sum(axis=1), 1.0)
    labels = np.arange(40) % 2 == 0
    separable = rng.normal(size=(40, 3)) + labels[:, None] * 3.0
    auc = colour_separability_auc(separable, labels, seed=0)
    assert auc is not None and auc > 0.95
    assert colour_separability_auc(separable[:6], labels[:6], seed=0) is None  # 3 per class < 5 folds


def test_optical_density_is_beer_lambert_of_each_pixel() -> None:
    tile = np.array([[[0, 119, 239], [255, 40, 7]]], np.uint8)
    np.testing.assert_allclose(optical_density(tile, 240), -np.log((tile.astype(float) + 1.0) / 240.0), rtol=1e-12)
    with pytest.raises(ValueError, match="uint8 RGB"):
        check_rgb(np.zeros((4, 4), np.uint8))
