"""Tests of the synthetic H&E-like generator (weakseg/data/synthetic.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from weakseg.data import synthetic
from weakseg.data.layout import Tile, read_annotations
from weakseg.data.synthetic import generate_dataset, render_tile
from weakseg.io import read_mask, read_rgb
from weakseg.normalization import choose_fit_tiles
from weakseg.params import NormalizeParams, SyntheticSourceParams
from weakseg.stain import fit_stain_reference, normalize_tile
from weakseg.tissue import colour_features, colour_separability_auc, mean_optical_density


def _small(**overrides: Any) -> SyntheticSourceParams:
    values: dict[str, Any] = {
        "num_tiles": 12,
        "tile_size": 64,
        "positive_fraction": 0.5,
        "test_fraction": 0.25,
        "seed": 3,
    }
    values.update(overrides)
    return SyntheticSourceParams(**values)


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "a", _small())
    generate_dataset(tmp_path / "b", _small())
    first, second = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "b")
    assert len(first) == 2 * 12 + 1
    assert first == second


def test_another_seed_gives_other_tiles(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "a", _small(seed=3))
    generate_dataset(tmp_path / "b", _small(seed=4))
    name = "images/synthetic_00000.png"
    assert _file_bytes(tmp_path / "a")[name] != _file_bytes(tmp_path / "b")[name]


def test_layout_counts_and_masks(tmp_path: Path) -> None:
    params = _small(num_tiles=20, positive_fraction=0.3, test_fraction=0.5)
    tiles = generate_dataset(tmp_path, params, positive_label="SSA", negative_label="HP")
    read_back = read_annotations(tmp_path / "annotations.csv", "SSA")
    assert read_back == tiles
    positives = [tile for tile in tiles if tile.positive]
    assert len(positives) == 6
    assert {tile.label for tile in tiles} == {"SSA", "HP"}
    # Stratified test partition: half of each class.
    assert sum(tile.partition == "test" for tile in positives) == 3
    assert sum(tile.partition == "test" for tile in tiles if not tile.positive) == 7
    for tile in tiles:
        image, mask = read_rgb(tmp_path / "images" / tile.name), read_mask(tmp_path / "masks" / tile.name)
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
        if tile.positive:
            assert 0.1 < mask.mean() < 0.7, tile.name
        else:
            assert not mask.any(), tile.name


def test_label_noise_flips_labels_but_not_pixels(tmp_path: Path) -> None:
    clean = generate_dataset(tmp_path / "clean", _small(num_tiles=20))
    noisy = generate_dataset(tmp_path / "noisy", _small(num_tiles=20, label_noise=0.2))
    flipped = [a.name for a, b in zip(clean, noisy, strict=True) if a.label != b.label]
    assert len(flipped) == 4
    assert _file_bytes(tmp_path / "clean") | {"annotations.csv": b""} == _file_bytes(tmp_path / "noisy") | {
        "annotations.csv": b""
    }
    # The mask stays the truth of what was drawn: a flipped drawn-negative keeps an empty mask.
    for clean_tile, noisy_tile in zip(clean, noisy, strict=True):
        mask = read_mask(tmp_path / "noisy" / "masks" / noisy_tile.name)
        assert mask.any() == clean_tile.positive


def test_positive_tile_mixes_serrated_region_and_regular_crypts() -> None:
    tile = render_tile(np.random.default_rng([5, 1]), 128, positive=True)
    assert tile.positive
    assert 0.15 <= tile.mask.mean() <= 0.65
    negative = render_tile(np.random.default_rng([5, 1]), 128, positive=False)
    assert not negative.mask.any()


def test_colours_look_like_h_and_e() -> None:
    images = np.stack([render_tile(np.random.default_rng([11, index]), 96, index % 2 == 0).image for index in range(8)])
    pixels = images.reshape(-1, 3).astype(float)
    tissue = pixels[pixels.mean(axis=1) < 200]
    red, green, blue = tissue.mean(axis=0)
    # Eosin-pink stroma and hematoxylin-purple nuclei both absorb green most.
    assert red > green and blue > green
    darkest = tissue[tissue.mean(axis=1) < np.quantile(tissue.mean(axis=1), 0.05)]
    assert darkest[:, 2].mean() > darkest[:, 0].mean()  # nuclei are blue-purple
    assert (pixels.min(axis=1) > 215).mean() > 0.05  # white lumens and glass


def _gland_areas(serrated: bool, count: int = 200) -> np.ndarray:
    """Mean (epithelium, lumen) pixels of ``count`` glands drawn as ``render_tile`` draws them (128 px tile)."""
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(count):
        shape = synthetic.draw_gland_shape(rng, 64.0, 64.0, 11.0, serrated)
        compartments = np.full((128, 128), synthetic.STROMA, dtype=np.uint8)
        unused = np.zeros((128, 128), dtype=bool)
        synthetic._draw_gland(shape, compartments, unused, unused.copy(), nucleus_spacing=3.1)
        areas.append([(compartments == synthetic.EPITHELIUM).sum(), (compartments == synthetic.LUMEN).sum()])
    return np.mean(areas, axis=0)


def test_serrated_glands_match_lumen_but_cover_less_area_than_regular_crypts() -> None:
    """The README's account of the colour difference: same lumen, about a fifth less gland, more stroma."""
    serrated, regular = _gland_areas(True), _gland_areas(False)
    lumen_ratio = serrated[1] / regular[1]
    epithelium_ratio = serrated[0] / regular[0]
    gland_ratio = serrated.sum() / regular.sum()
    assert 0.95 < lumen_ratio < 1.1, lumen_ratio
    assert 0.65 < epithelium_ratio < 0.8, epithelium_ratio
    assert 0.75 < gland_ratio < 0.85, gland_ratio


def test_positive_tile_is_pinker_than_its_negative_twin_under_the_same_stains() -> None:
    """One generator seed renders a tile both ways: same stains, light, tissue and gland lattice (all drawn
    before anything that depends on the class), so any colour difference is composition, not stain."""
    pinker = []
    for index in range(20):
        density = {
            positive: mean_optical_density(render_tile(np.random.default_rng([99, index]), 128, positive).image)
            for positive in (True, False)
        }
        # Eosin absorbs green far more than red; hematoxylin absorbs both: green minus red is eosin's share.
        pinker.append((density[True][1] - density[True][0]) > (density[False][1] - density[False][0]))
    assert all(pinker)


def test_colour_only_auc_of_the_demo_before_and_after_normalization() -> None:
    """The README's numbers, ``colour_separability`` of the demo's metrics/normalize.json: the normalize
    stage's features, reference and cross-validated AUC on the train tiles of params.yaml's synthetic set."""
    demo = SyntheticSourceParams(num_tiles=300, positive_fraction=0.31, test_fraction=0.31, tile_size=128, seed=0)
    config = NormalizeParams()  # params.yaml's normalize section is the schema's defaults
    positive, test, _ = synthetic._assignments(demo)
    train = {
        synthetic.tile_name(index): (
            render_tile(np.random.default_rng([demo.seed, index]), demo.tile_size, bool(positive[index])).image,
            bool(positive[index]),
        )
        for index in np.flatnonzero(~test).tolist()
    }
    tiles = [Tile(name, "SSA" if label else "HP", "train", label) for name, (_, label) in train.items()]
    fit_on = choose_fit_tiles(tiles, config.fit_tiles, config.seed, Path("annotations.csv"))
    reference = fit_stain_reference(
        [train[tile.name][0] for tile in fit_on],
        background_intensity=config.background_intensity,
        alpha=config.alpha,
        beta=config.beta,
        min_tissue_fraction=config.min_tissue_fraction,
    )
    labels = np.array([label for _, label in train.values()])
    io = config.background_intensity
    raw = np.stack([colour_features(image, background_intensity=io) for image, _ in train.values()])
    normalized = np.stack(
        [
            colour_features(normalize_tile(image, reference, config.min_tissue_fraction)[0], background_intensity=io)
            for image, _ in train.values()
        ]
    )
    assert colour_separability_auc(raw, labels, seed=config.seed) == pytest.approx(0.70, abs=0.02)
    assert colour_separability_auc(normalized, labels, seed=config.seed) == pytest.approx(0.87, abs=0.02)


def test_equal_labels_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must differ"):
        generate_dataset(tmp_path, _small(), positive_label="HP", negative_label="HP")
