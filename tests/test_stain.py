"""Tests of weakseg.stain: Macenko normalization (against torchstain), degenerate tiles, reference files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer  # type: ignore[import-untyped]

from weakseg.io import read_rgb
from weakseg.stain import (
    StainReference,
    StainReferenceError,
    _covariance,
    _row_percentile,
    fit_stain_reference,
    load_normalize_settings,
    load_stain_reference,
    normalize_tile,
    save_stain_reference,
)

IO = 240.0
# Columns hematoxylin, eosin (unit optical-density vectors, rows R, G, B).
STAINS_A = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])  # torchstain's default reference
STAINS_B = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])  # Ruifrok & Johnston's H and E
STAINS_POISON = np.array([[0.20, 0.80], [0.30, 0.20], [0.93, 0.56]])  # nothing like H&E


def unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=0, keepdims=True)


def concentration_fields(size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hematoxylin and eosin concentrations of one synthetic tissue, and its lumen (no stain).

    Nuclei are dense hematoxylin blobs, stroma smooth eosin with a little hematoxylin, lumen a white ellipse.
    """
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:size, 0:size]
    lumen = ((rows - size * 0.3) / (size * 0.22)) ** 2 + ((columns - size * 0.65) / (size * 0.3)) ** 2 < 1.0
    eosin = 0.35 + 0.5 * ndimage.gaussian_filter(rng.random((size, size)), size / 16)
    eosin = (eosin - eosin.min()) / (eosin.max() - eosin.min()) * 0.6 + 0.3
    # Stroma holds a little hematoxylin, nowhere the same, somewhere none (Macenko needs near-pure pixels).
    hematoxylin = ndimage.gaussian_filter(rng.random((size, size)), size / 16)
    hematoxylin = (hematoxylin - hematoxylin.min()) / (hematoxylin.max() - hematoxylin.min()) * 0.3
    for _ in range(size * size // 180):
        centre = rng.uniform(0, size, 2)
        radius = rng.uniform(2.0, 4.0)
        nucleus = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 < radius**2
        hematoxylin[nucleus] = rng.uniform(1.0, 1.6)
    hematoxylin[lumen] = 0.0
    eosin[lumen] = 0.0
    return hematoxylin, eosin, ~lumen


def render(
    hematoxylin: np.ndarray, eosin: np.ndarray, stains: np.ndarray, seed: int, strength: float = 1.0
) -> np.ndarray:
    """Beer-Lambert: I = Io exp(-(h c_H + e c_E)), with one grey level of sensor noise."""
    density = strength * (hematoxylin[..., None] * unit(stains)[:, 0] + eosin[..., None] * unit(stains)[:, 1])
    noise = np.random.default_rng(seed).normal(0.0, 1.0, density.shape)
    return np.clip(np.rint(IO * np.exp(-density) + noise), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tissue() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return concentration_fields(96, seed=3)


@pytest.fixture(scope="module")
def reference() -> StainReference:
    """Fitted on other tissue than the tiles under test."""
    hematoxylin, eosin, _ = concentration_fields(96, seed=11)
    return fit_stain_reference([render(hematoxylin, eosin, STAINS_A, seed=5)])


# ------------------------------------------------------------------------------ normalization works
def test_two_stainings_of_one_tissue_end_up_closer(tissue, reference) -> None:
    hematoxylin, eosin, stained = tissue
    tile_a = render(hematoxylin, eosin, STAINS_A, seed=1)
    tile_b = render(hematoxylin, eosin, STAINS_B, seed=2, strength=1.4)
    normalized_a, changed_a = normalize_tile(tile_a, reference)
    normalized_b, changed_b = normalize_tile(tile_b, reference)
    assert changed_a and changed_b
    before = np.abs(tile_a.astype(float) - tile_b.astype(float))[stained].mean()
    after = np.abs(normalized_a.astype(float) - normalized_b.astype(float))[stained].mean()
    assert before > 15.0  # the two renderings really differ
    assert after < 0.35 * before, (before, after)
    assert normalized_a.shape == tile_a.shape and normalized_a.dtype == np.uint8


def test_recovers_the_stain_vectors_it_was_rendered_with(tissue) -> None:
    hematoxylin, eosin, _ = tissue
    fitted = fit_stain_reference([render(hematoxylin, eosin, STAINS_A, seed=4)])
    cosines = np.sum(fitted.stain_matrix * unit(STAINS_A), axis=0)
    assert np.all(cosines > 0.99), cosines  # hematoxylin first, eosin second, both found


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_torchstain(seed: int) -> None:
    hematoxylin, eosin, _ = concentration_fields(128, seed=20 + seed)
    reference_tile = render(hematoxylin, eosin, STAINS_A, seed=seed)
    hematoxylin, eosin, _ = concentration_fields(128, seed=40 + seed)
    tile = render(hematoxylin, eosin, STAINS_B, seed=seed + 7, strength=1.2)
    library = NumpyMacenkoNormalizer()
    library.fit(reference_tile)
    ours = fit_stain_reference([reference_tile])
    np.testing.assert_allclose(ours.stain_matrix, library.HERef, atol=1e-3)
    np.testing.assert_allclose(ours.max_concentrations, library.maxCRef, rtol=5e-3)
    expected, _, _ = library.normalize(tile, stains=False)
    result, changed = normalize_tile(tile, ours)
    assert changed
    difference = np.abs(result.astype(int) - expected.astype(int))
    # Rounding versus torchstain's truncation, and float32 unmixing: at most a few grey levels.
    assert difference.mean() < 1.0
    assert np.percentile(difference, 99.9) <= 3


def test_agrees_with_torchstain_on_real_tiles(shared_dataset: Path) -> None:
    names = sorted(path.name for path in (shared_dataset / "images").iterdir())[::150][:4]
    tiles = [read_rgb(shared_dataset / "images" / name) for name in names]
    library = NumpyMacenkoNormalizer()
    library.fit(tiles[0])
    ours = fit_stain_reference(tiles[:1])
    np.testing.assert_allclose(ours.stain_matrix, library.HERef, atol=1e-3)
    np.testing.assert_allclose(ours.max_concentrations, library.maxCRef, rtol=5e-3)
    for tile in tiles[1:]:
        expected, _, _ = library.normalize(tile, stains=False)
        result, changed = normalize_tile(tile, ours)
        difference = np.abs(result.astype(int) - expected.astype(int))
        assert changed and difference.mean() < 1.0 and np.percentile(difference, 99.9) <= 3


def test_fast_paths_match_numpy(rng: np.random.Generator) -> None:
    samples = rng.gamma(2.0, 0.3, size=(1001, 3))
    np.testing.assert_allclose(_covariance(samples), np.cov(samples.T), rtol=1e-10)
    values = rng.normal(size=(2, 777)).astype(np.float32)
    np.testing.assert_allclose(_row_percentile(values, 99.0), np.percentile(values, 99.0, axis=1), rtol=1e-6)


def test_median_fit_resists_an_oddly_stained_tile() -> None:
    tiles = []
    for seed in range(5):
        hematoxylin, eosin, _ = concentration_fields(64, seed=60 + seed)
        tiles.append(render(hematoxylin, eosin, STAINS_A if seed < 4 else STAINS_POISON, seed=seed))
    fitted = fit_stain_reference(tiles, names=[f"t{index}" for index in range(5)])
    alone = fit_stain_reference(tiles[:4])
    assert np.abs(fitted.stain_matrix - alone.stain_matrix).max() < 0.05
    assert fitted.fitted_on == ("t0", "t1", "t2", "t3", "t4")


def test_normalization_is_deterministic(tissue, reference) -> None:
    hematoxylin, eosin, _ = tissue
    tile = render(hematoxylin, eosin, STAINS_B, seed=9)
    first, _ = normalize_tile(tile, reference)
    second, _ = normalize_tile(tile.copy(), reference)
    assert first.tobytes() == second.tobytes()
    refit = fit_stain_reference([render(*concentration_fields(96, seed=11)[:2], STAINS_A, seed=5)])
    assert refit.to_dict() == reference.to_dict()


# --------------------------------------------------------------------------------- degenerate tiles
def degenerate_tiles(tissue) -> dict[str, np.ndarray]:
    hematoxylin, eosin, _ = tissue
    almost_white = np.full((64, 64, 3), 245, np.uint8)
    almost_white[:3, :3] = render(hematoxylin, eosin, STAINS_A, seed=0)[:3, :3]  # 9 stained pixels
    return {
        "white": np.full((64, 64, 3), 255, np.uint8),
        "almost_white": almost_white,
        "one_colour": np.broadcast_to(np.array([150, 60, 140], np.uint8), (64, 64, 3)).copy(),
        "one_colour_with_noise": np.clip(
            np.array([150, 60, 140]) + np.random.default_rng(0).normal(0, 2, (64, 64, 3)), 0, 255
        ).astype(np.uint8),
        "black": np.zeros((64, 64, 3), np.uint8),
        "saturated_stripes": np.broadcast_to(
            np.where(np.arange(64) % 2 == 0, 0, 255).astype(np.uint8)[None, :, None], (64, 64, 3)
        ).copy(),
    }


def test_degenerate_tiles_pass_through(tissue, reference) -> None:
    for name, tile in degenerate_tiles(tissue).items():
        with np.errstate(all="raise"):  # no NaN, no division by zero on the way
            result, changed = normalize_tile(tile, reference)
        assert not changed, name
        assert np.array_equal(result, tile), name


def test_method_none_returns_the_tile(tissue: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    tile = render(*tissue[:2], STAINS_B, seed=3)
    result, changed = normalize_tile(tile, None)
    assert not changed and np.array_equal(result, tile) and result is not tile


def test_fit_skips_degenerate_tiles_and_refuses_only_degenerate(
    tissue: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    tiles = degenerate_tiles(tissue)
    good = render(*tissue[:2], STAINS_A, seed=1)
    fitted = fit_stain_reference([tiles["white"], good], names=["white.png", "good.png"])
    assert fitted.fitted_on == ("good.png",) and fitted.skipped == ("white.png",)
    with pytest.raises(StainReferenceError, match="normalize.reference"):
        fit_stain_reference(list(tiles.values()))


# ---------------------------------------------------------------------------------------- files
def test_reference_file_round_trip(tmp_path: Path, reference: StainReference) -> None:
    path = tmp_path / "stain_reference.json"
    save_stain_reference(path, reference)
    loaded = load_stain_reference(path)
    assert loaded is not None
    np.testing.assert_allclose(loaded.stain_matrix, reference.stain_matrix, atol=1e-8)
    np.testing.assert_allclose(loaded.max_concentrations, reference.max_concentrations, atol=1e-8)
    save_stain_reference(path, None, settings={"min_tissue_fraction": 0.1})
    assert load_stain_reference(path) is None
    assert load_normalize_settings(path) == {"min_tissue_fraction": 0.1}


def test_bad_reference_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(StainReferenceError, match="missing.json"):
        load_stain_reference(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"method": "macenko", "stain_matrix": [[1, 0]]}')
    with pytest.raises(StainReferenceError, match="broken.json"):
        load_stain_reference(broken)
