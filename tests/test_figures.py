"""Figure helpers: error-map colours pixel by pixel, uncertainty values, overlays, and saved grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakseg import figures

WHITE, RED, BLUE, BLACK = (255, 255, 255), (255, 0, 0), (0, 0, 255), (0, 0, 0)


def test_error_map_colours_every_outcome() -> None:
    prediction = np.array([[1, 1], [0, 0]], dtype=bool)
    truth = np.array([[1, 0], [1, 0]], dtype=bool)
    colours = figures.error_map(prediction, truth)
    assert colours.dtype == np.uint8 and colours.shape == (2, 2, 3)
    assert tuple(colours[0, 0]) == WHITE  # true positive
    assert tuple(colours[0, 1]) == RED  # false positive
    assert tuple(colours[1, 0]) == BLUE  # false negative
    assert tuple(colours[1, 1]) == BLACK  # true negative


def test_error_map_of_a_larger_case_matches_pixel_by_pixel(rng: np.random.Generator) -> None:
    prediction = rng.random((16, 12)) < 0.5
    truth = (rng.random((16, 12)) < 0.5).astype(np.uint8) * 255  # 0/255 masks work too
    colours = figures.error_map(prediction, truth)
    truth_bool = truth > 0
    for row in range(16):
        for column in range(12):
            expected = {(True, True): WHITE, (True, False): RED, (False, True): BLUE, (False, False): BLACK}[
                (bool(prediction[row, column]), bool(truth_bool[row, column]))
            ]
            assert tuple(colours[row, column]) == expected


def test_error_map_refuses_different_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        figures.error_map(np.zeros((2, 2)), np.zeros((3, 2)))


def test_uncertainty_is_one_at_half_and_zero_when_sure() -> None:
    values = figures.uncertainty(np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.7, -0.2]))
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.5, 0.0, 0.0, 0.0])


def test_heatmap_ends_are_blue_and_red() -> None:
    colours = figures.heatmap(np.array([[0.0, 1.0, 2.0]]))
    assert colours.shape == (1, 3, 3) and colours.dtype == np.uint8
    assert colours[0, 0, 2] > 100 and colours[0, 0, 0] == 0  # jet starts dark blue
    assert colours[0, 1, 0] > 100 and colours[0, 1, 2] == 0  # and ends dark red
    np.testing.assert_array_equal(colours[0, 1], colours[0, 2])  # clipped above 1


def test_overlay_mask_tints_inside_outlines_the_edge_and_leaves_outside() -> None:
    image = np.full((8, 8, 3), 100, dtype=np.uint8)
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 2:6] = True
    result = figures.overlay_mask(image, mask, colour=(0, 255, 0), alpha=0.5)
    np.testing.assert_array_equal(result[0, 0], [100, 100, 100])
    np.testing.assert_array_equal(result[2, 2], [0, 255, 0])  # inner boundary
    np.testing.assert_array_equal(result[3, 3], [50, 178, 50])  # 0.5 * 100 + 0.5 * (0, 255, 0), rounded
    assert result.dtype == np.uint8


def test_overlay_heatmap_blends_with_alpha() -> None:
    image = np.zeros((1, 1, 3), dtype=np.uint8)
    blended = figures.overlay_heatmap(image, np.ones((1, 1)), alpha=0.5)
    expected = np.round(0.5 * figures.heatmap(np.ones((1, 1))).astype(float)).astype(np.uint8)
    np.testing.assert_array_equal(blended, expected)


def test_save_figure_writes_the_same_bytes_twice(tmp_path: Path, rng: np.random.Generator) -> None:
    rows = [[rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), np.eye(8, dtype=bool), rng.random((8, 8))]]
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    figures.save_figure(first, rows, column_titles=["rgb", "mask", "float"], row_titles=["tile"], title="t")
    figures.save_figure(second, rows, column_titles=["rgb", "mask", "float"], row_titles=["tile"], title="t")
    assert first.read_bytes() == second.read_bytes()
    with Image.open(first) as saved:
        width, height = saved.size
    assert width > height > 0  # three cells side by side
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left over


def test_save_figure_refuses_an_empty_grid(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one image"):
        figures.save_figure(tmp_path / "x.png", [])


def test_save_roc_figure_writes_the_same_bytes_twice(tmp_path: Path) -> None:
    points = [{"fpr": 0.0, "tpr": 0.0}, {"fpr": 0.25, "tpr": 0.75}, {"fpr": 1.0, "tpr": 1.0}]
    curves = [("classifier", points, 0.8), ("segmenter head", points[::2], 0.5)]
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    figures.save_roc_figure(first, curves)
    figures.save_roc_figure(second, curves)
    assert first.read_bytes() == second.read_bytes()
    with Image.open(first) as saved:
        assert saved.size == (450, 450)  # 4.5 in at 100 dpi
    assert not list(tmp_path.glob(".*.tmp"))
