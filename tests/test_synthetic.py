"""Tests of the synthetic H&E-like generator (weakseg/data/synthetic.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from weakseg.data.layout import read_annotations
from weakseg.data.synthetic import generate_dataset, render_tile
from weakseg.io import read_mask, read_rgb
from weakseg.params import SyntheticSourceParams


def _small(**overrides: object) -> SyntheticSourceParams:
    values = {"num_tiles": 12, "tile_size": 64, "positive_fraction": 0.5, "test_fraction": 0.25, "seed": 3}
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
    flipped = [a.name for a, b in zip(clean, noisy) if a.label != b.label]
    assert len(flipped) == 4
    assert _file_bytes(tmp_path / "clean") | {"annotations.csv": b""} == _file_bytes(tmp_path / "noisy") | {
        "annotations.csv": b""
    }
    # The mask stays the truth of what was drawn: a flipped drawn-negative keeps an empty mask.
    for clean_tile, noisy_tile in zip(clean, noisy):
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


def test_colour_histograms_cannot_separate_the_classes() -> None:
    count, size = 150, 128
    features, labels = [], []
    for index in range(count):
        positive = index % 3 == 0
        image = render_tile(np.random.default_rng([2024, index]), size, positive).image
        histograms = [np.histogram(image[..., channel], bins=8, range=(0, 256))[0] for channel in range(3)]
        features.append(np.concatenate(histograms) / size**2)
        labels.append(positive)
    features, labels = np.array(features), np.array(labels)
    order = np.random.default_rng(0).permutation(count)
    train, test = order[: count // 2], order[count // 2 :]
    model = LogisticRegression(max_iter=5000).fit(features[train], labels[train])
    auc = roc_auc_score(labels[test], model.predict_proba(features[test])[:, 1])
    assert auc < 0.75, f"colour alone separates the classes (AUC {auc:.3f})"


def test_equal_labels_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must differ"):
        generate_dataset(tmp_path, _small(), positive_label="HP", negative_label="HP")
