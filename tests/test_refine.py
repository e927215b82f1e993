"""Tests of weakseg.refine: each step of the CAM -> pseudo-mask chain on hand-made arrays."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from weakseg.errors import UserInputError
from weakseg.refine import (
    CrfSettings,
    RefineSettings,
    close_mask,
    crf_unary_probability,
    dense_crf,
    fill_enclosed_holes,
    foreground_fraction,
    mask_from_probability,
    open_mask,
    refine_pseudo_mask,
    remove_small_components,
    threshold_cam,
)


def ramp(size: int = 16) -> np.ndarray:
    """A CAM rising left to right: column j has value j / (size - 1)."""
    return np.tile(np.linspace(0.0, 1.0, size), (size, 1))


# ------------------------------------------------------------------------------------------ threshold
def test_threshold_takes_the_quantile_within_tissue_only() -> None:
    cam = ramp(16)
    tissue = np.zeros((16, 16), dtype=bool)
    tissue[:, 8:] = True  # tissue is the right half: columns 8..15
    mask = threshold_cam(cam, tissue, quantile=0.5, restrict_to_tissue=True)
    # The median over tissue lies between columns 11 and 12, so columns 12..15 are kept.
    assert mask.dtype == bool
    assert np.array_equal(np.flatnonzero(mask.any(axis=0)), np.arange(12, 16))
    assert not mask[:, :8].any()


def test_threshold_over_the_whole_tile_when_not_restricted() -> None:
    cam = ramp(16)
    tissue = np.zeros((16, 16), dtype=bool)
    tissue[:, 8:] = True
    mask = threshold_cam(cam, tissue, quantile=0.5, restrict_to_tissue=False)
    assert np.array_equal(np.flatnonzero(mask.any(axis=0)), np.arange(8, 16))


def test_threshold_of_uint8_cam_matches_float_and_flat_cam_is_empty() -> None:
    cam = ramp(16)
    tissue = np.ones((16, 16), dtype=bool)
    as_bytes = (cam * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(threshold_cam(as_bytes, tissue, 0.75), threshold_cam(cam, tissue, 0.75))
    assert not threshold_cam(np.full((8, 8), 0.3), None, 0.5).any()
    assert not threshold_cam(cam, np.zeros((16, 16), dtype=bool), 0.5).any()


def test_threshold_keeps_tied_pixels_of_a_saturated_cam() -> None:
    cam = np.zeros((10, 10), dtype=np.uint8)
    cam[:, :6] = 255  # 60 % of the tile saturated: the median is 255 itself
    mask = threshold_cam(cam, None, 0.5)
    np.testing.assert_array_equal(mask, cam == 255)
    cam[:, :3] = 200  # now 30 % at 255 and 30 % at 200, the median is 200: strict keeps only 30 %
    np.testing.assert_array_equal(threshold_cam(cam, None, 0.5), cam >= 200)
    np.testing.assert_array_equal(threshold_cam(cam, None, 0.8), cam == 255)


def test_threshold_rejects_bad_input_naming_the_problem() -> None:
    with pytest.raises(UserInputError, match="tissue mask shape"):
        threshold_cam(ramp(16), np.ones((8, 8), dtype=bool))
    with pytest.raises(UserInputError, match="threshold_quantile"):
        threshold_cam(ramp(16), None, quantile=1.5)


# ----------------------------------------------------------------------------------------- morphology
def test_opening_removes_specks_and_keeps_blocks() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:10, 2:10] = True  # a block survives a 3x3 opening
    mask[15, 15] = True  # a speck does not
    mask[15, 2:12] = True  # nor does a one-pixel line
    opened = open_mask(mask, 3)
    assert opened[2:10, 2:10].all()
    assert not opened[15].any()
    assert opened.sum() == 64
    np.testing.assert_array_equal(open_mask(mask, 0), mask)


def test_closing_fills_small_gaps_but_not_large_ones() -> None:
    mask = np.zeros((24, 24), dtype=bool)
    mask[4:20, 4:20] = True
    mask[10:12, 10:12] = False  # a 2x2 hole: closed by a 5x5 kernel
    mask[4:20, 15:17] = False  # a 2-px slit across the block: bridged
    closed = close_mask(mask, 5)
    assert closed[4:20, 4:20].all()
    assert not closed[:4].any() and not closed[20:].any()  # it does not grow outward
    wide = np.zeros((24, 24), dtype=bool)
    wide[4:20, 2:8] = True
    wide[4:20, 16:22] = True  # an 8-px gap is wider than the kernel
    assert not close_mask(wide, 5)[:, 9:15].any()


def test_small_components_below_the_size_are_removed() -> None:
    mask = np.zeros((30, 30), dtype=bool)
    mask[0:8, 0:8] = True  # 64 px: kept (not smaller than 64)
    mask[20:27, 20:29] = True  # 63 px: removed
    mask[12:14, 12:14] = True  # 4 px: removed
    kept = remove_small_components(mask, 64)
    assert kept.sum() == 64 and kept[0:8, 0:8].all()
    np.testing.assert_array_equal(remove_small_components(mask, 0), mask)


# ------------------------------------------------------------------------------------------------ CRF
def two_colour_tile(size: int = 48) -> np.ndarray:
    """Purple (lesion-like) left half, pale pink right half: a colour edge at column size // 2."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:, : size // 2] = (150, 60, 150)
    image[:, size // 2 :] = (235, 200, 220)
    return image


@pytest.mark.parametrize("unary", ["hard", "probability"])
def test_crf_moves_the_boundary_towards_the_colour_edge(unary: str) -> None:
    size = 48
    image = two_colour_tile(size)
    mask = np.zeros((size, size), dtype=bool)
    mask[:, :16] = True  # boundary at column 16, the colour edge at 24
    settings = CrfSettings(unary=unary)
    cam = 1.0 - ramp(size)  # decreasing to the right, like the mask
    probability = crf_unary_probability(mask, cam, float(np.quantile(cam, 0.5)), None, settings)
    refined = dense_crf(image, probability, settings)
    columns = refined.mean(axis=0)
    boundary_before = 16
    boundary_after = int(np.count_nonzero(columns > 0.5))
    assert abs(boundary_after - size // 2) < abs(boundary_before - size // 2)
    assert abs(boundary_after - size // 2) <= 2
    assert not refined[:, size // 2 + 2 :].any()


def test_crf_unary_kinds_and_tissue_cap() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[:, :2] = True
    cam = ramp(4)
    tissue = np.ones((4, 4), dtype=bool)
    tissue[0] = False
    hard = crf_unary_probability(mask, cam, 0.5, tissue, CrfSettings(unary="hard", hard_confidence=0.8))
    np.testing.assert_allclose(hard[1:, :2], 0.8)
    np.testing.assert_allclose(hard[1:, 2:], 0.2)
    np.testing.assert_allclose(hard[0], 0.2)  # outside tissue: background level
    soft = crf_unary_probability(mask, cam, 0.5, None, CrfSettings(unary="probability", hard_confidence=0.8))
    # The CAM moves the probability: same hard label, different CAM values, different probabilities.
    assert soft[0, 3] > soft[0, 2] and soft[0, 1] > soft[0, 0]
    with pytest.raises(UserInputError, match="refine.crf.unary"):
        crf_unary_probability(mask, cam, 0.5, None, CrfSettings(unary="soft"))


# ---------------------------------------------------------------------------------------------- chain
def test_negative_tiles_get_empty_masks_at_every_step() -> None:
    cam = ramp(32)
    steps = refine_pseudo_mask(cam, two_colour_tile(32), None, positive=False, settings=RefineSettings())
    for mask in (steps.thresholded, steps.morphology, steps.refined):
        assert mask.shape == (32, 32) and mask.dtype == bool and not mask.any()


def test_chain_on_a_positive_tile_keeps_the_refined_region_in_tissue() -> None:
    size = 48
    cam = 1.0 - ramp(size)
    tissue = np.ones((size, size), dtype=bool)
    tissue[:6] = False
    settings = RefineSettings(min_object_size=16)
    steps = refine_pseudo_mask(cam, two_colour_tile(size), tissue, positive=True, settings=settings)
    assert steps.thresholded[6:, :24].all() and not steps.thresholded[:, 24:].any()
    assert not steps.thresholded[:6].any()
    assert not steps.refined[:6].any()
    assert steps.refined[6:, :20].all()
    assert not steps.refined[:, 28:].any()
    no_crf = refine_pseudo_mask(cam, two_colour_tile(size), tissue, True, RefineSettings(crf=None))
    np.testing.assert_array_equal(no_crf.refined, no_crf.morphology & tissue)


def test_foreground_fraction() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[0] = True
    within = np.zeros((4, 4), dtype=bool)
    within[:2] = True
    assert foreground_fraction(mask) == 0.25
    assert foreground_fraction(mask, within) == 0.5
    assert foreground_fraction(mask, np.zeros((4, 4), dtype=bool)) == 0.0


def test_the_crf_unary_and_the_threshold_share_one_cut() -> None:
    """A saturated 8-bit CAM ties at its quantile: the tie rule keeps the tied pixels, and the CRF's
    starting probability must call exactly those pixels foreground (above 0.5), not leave them at 0.5."""
    from weakseg.refine import cam_foreground_probability, quantile_cut

    cam = np.zeros((20, 20), dtype=np.uint8)
    cam[:, :8] = 100
    cam[:, 8:] = 255  # 60 % of the tile tied at the maximum, the median among them
    values = cam.astype(np.float64) / 255.0
    mask = threshold_cam(cam, None, quantile=0.5)
    assert mask[:, 8:].all() and not mask[:, :8].any()  # the tie rule keeps the tied 60 %, nearer than 0 %
    cut = quantile_cut(values, 0.5)
    assert cut == pytest.approx(100 / 255)
    np.testing.assert_array_equal(cam_foreground_probability(values, cut) > 0.5, mask)
    # A flat CAM stays empty at the median (the strict side wins a tie of distances).
    assert not threshold_cam(np.full((8, 8), 7, dtype=np.uint8), None, 0.5).any()


# ------------------------------------------------------------------------------------------ ignore band
def _band_tile() -> tuple[np.ndarray, np.ndarray]:
    """A 4 x 5 CAM with values 0..19 (row-major, over 19) and tissue everywhere but the last column.

    The tissue holds the 16 values 0-3, 5-8, 10-13, 15-18. Quantile 0.5 of them is 9 (half lie above), 0.25
    is 4.5 (three quarters lie above): so the foreground is {10-13, 15-18}, the confident tissue background
    {0-3}, the band {5-8}; the last column (4, 9, 14, 19, the brightest pixel included) is not tissue.
    """
    cam = np.arange(20, dtype=np.float64).reshape(4, 5) / 19.0
    tissue = np.ones((4, 5), dtype=bool)
    tissue[:, 4] = False
    return cam, tissue


def _pixels(values: list[int]) -> np.ndarray:
    mask = np.zeros(20, dtype=bool)
    mask[values] = True
    return mask.reshape(4, 5)


PLAIN_CHAIN: dict[str, Any] = {
    "opening_kernel": 0,
    "closing_kernel": 0,
    "min_object_size": 0,
    "crf": None,
    "threshold_quantile": 0.5,
}


@pytest.mark.parametrize(
    ("background_quantile", "ignored"),
    [(0.25, [5, 6, 7, 8]), (0.0, [0, 1, 2, 3, 5, 6, 7, 8]), (0.5, [])],
)
def test_ignore_band_on_a_hand_made_cam(background_quantile: float, ignored: list[int]) -> None:
    """Foreground from the chain as today; background = not tissue + tissue CAM at or below the b-quantile;
    the rest of the tissue is ignored. b = 0 calls no tissue pixel background; b = threshold leaves no band."""
    cam, tissue = _band_tile()
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    settings = RefineSettings(**PLAIN_CHAIN, background_quantile=background_quantile)
    steps = refine_pseudo_mask(cam, image, tissue, True, settings)
    foreground = _pixels([10, 11, 12, 13, 15, 16, 17, 18])
    np.testing.assert_array_equal(steps.refined, foreground)
    np.testing.assert_array_equal(steps.ignore, _pixels(ignored))
    background = ~steps.refined & ~steps.ignore
    assert background[:, 4].all()  # outside the tissue, even the brightest CAM pixel
    assert steps.ignore.dtype == bool and not (steps.ignore & steps.refined).any()
    # Without background_quantile: the same foreground, nothing ignored (today's two labels).
    plain = refine_pseudo_mask(cam, image, tissue, True, RefineSettings(**PLAIN_CHAIN))
    np.testing.assert_array_equal(plain.refined, foreground)
    assert plain.ignore.shape == (4, 5) and not plain.ignore.any()


def test_ignore_band_yields_to_the_foreground_and_uses_the_chains_cut() -> None:
    """A foreground pixel with a low CAM (closing or the CRF can add one) stays foreground, never ignored;
    the band's cut is quantile_cut's, ties included: an 8-bit CAM tied at its quantile."""
    from weakseg.refine import ignore_band

    cam, tissue = _band_tile()
    foreground = _pixels([6, 10, 11, 12, 13, 15, 16, 17, 18])  # 6 lies in the band
    np.testing.assert_array_equal(ignore_band(cam, tissue, foreground, 0.25), _pixels([5, 7, 8]))
    # Half the tile at 40, half at 200: the 0.25-quantile is 40. Above it lie 50 % (strict) or 100 % (the tie
    # too), equally far from the wanted 75 %: quantile_cut's strict side wins, so the 40s are background.
    tied = np.full((4, 4), 40, dtype=np.uint8)
    tied[:, 2:] = 200
    no_foreground = np.zeros((4, 4), dtype=bool)
    assert not ignore_band(tied, None, no_foreground, 0.25)[:, :2].any()
    assert ignore_band(tied, None, no_foreground, 0.25)[:, 2:].all()


def test_ignore_band_is_empty_on_negative_tiles() -> None:
    cam, tissue = _band_tile()
    steps = refine_pseudo_mask(
        cam, np.zeros((4, 5, 3), dtype=np.uint8), tissue, False, RefineSettings(**PLAIN_CHAIN, background_quantile=0.25)
    )
    assert not steps.refined.any() and not steps.ignore.any()


def test_background_quantile_above_the_threshold_quantile_is_refused() -> None:
    cam, tissue = _band_tile()
    settings = RefineSettings(**{**PLAIN_CHAIN, "threshold_quantile": 0.4}, background_quantile=0.6)
    with pytest.raises(UserInputError, match=r"refine\.background_quantile.*refine\.threshold_quantile"):
        refine_pseudo_mask(cam, np.zeros((4, 5, 3), dtype=np.uint8), tissue, True, settings)


# ------------------------------------------------------------------------------------------ hole filling
def test_fill_enclosed_holes_fills_what_the_mask_encloses_and_nothing_open_to_the_edge() -> None:
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:7, 1:7] = True
    mask[3:5, 3:5] = False  # a lumen inside the region: filled
    mask[8:12, 8:12] = True
    mask[10:12, 10:12] = False  # a notch open to the image's edge: kept out
    before = mask.copy()
    filled = fill_enclosed_holes(mask)
    expected = before.copy()
    expected[3:5, 3:5] = True
    assert filled.dtype == bool
    np.testing.assert_array_equal(filled, expected)
    np.testing.assert_array_equal(mask, before)  # the input is not modified


def test_fill_enclosed_holes_counts_background_as_connected_along_rows_and_columns_only() -> None:
    # [2, 2] reaches the edge's [0, 0] only through diagonal steps: it and [1, 1] are enclosed.
    mask = np.ones((5, 5), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = False
    filled = fill_enclosed_holes(mask)
    assert filled[1, 1] and filled[2, 2] and not filled[0, 0]
    assert not fill_enclosed_holes(np.zeros((4, 4), dtype=bool)).any()


def test_mask_from_probability_thresholds_restricts_to_tissue_then_fills() -> None:
    probability = np.full((7, 7), 0.5)
    probability[0, :] = 0.49  # below the threshold: never foreground
    tissue = np.ones((7, 7), dtype=bool)
    tissue[3, 3] = False  # a lumen the mask encloses
    assert mask_from_probability(probability, 0.5).sum() == 42  # the threshold is inclusive
    kept = mask_from_probability(probability, 0.5, tissue)
    assert kept.sum() == 41 and not kept[3, 3]
    filled = mask_from_probability(probability, 0.5, tissue, fill_holes=True)
    assert filled[3, 3] and filled.sum() == 42
