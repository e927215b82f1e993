"""Tests of weakseg.normalization: the fit-tile choice, one tile's processing, and the stage's summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_stain import STAINS_A, concentration_fields, render
from weakseg.data.layout import Tile
from weakseg.errors import UserInputError
from weakseg.io import read_mask, read_rgb, write_png
from weakseg.normalization import (
    NormalizeJob,
    TileOutcome,
    choose_fit_tiles,
    process_tile,
    recorded_settings,
    summarize,
)
from weakseg.params import NormalizeParams
from weakseg.stain import fit_stain_reference
from weakseg.tissue import tissue_mask


def tiles_of(partitions: str) -> list[Tile]:
    """One tile per letter: ``r`` train, ``e`` test; alternately positive and negative."""
    kinds = {"r": "train", "e": "test"}
    return [Tile(f"t{index:02d}.png", "SSA", kinds[kind], index % 2 == 0) for index, kind in enumerate(partitions)]


def test_fit_tiles_are_a_seeded_choice_of_train_tiles_only() -> None:
    tiles = tiles_of("rerererrrreeee")
    chosen = choose_fit_tiles(tiles, 4, seed=7, annotations=Path("annotations.csv"))
    assert len(chosen) == 4 and all(tile.partition == "train" for tile in chosen)
    assert [tile.name for tile in chosen] == sorted(tile.name for tile in chosen)
    assert chosen == choose_fit_tiles(list(reversed(tiles)), 4, seed=7, annotations=Path("annotations.csv"))
    assert len(choose_fit_tiles(tiles, 100, seed=7, annotations=Path("a.csv"))) == 7  # every train tile
    with pytest.raises(UserInputError, match="raw/annotations.csv: no train tiles"):
        choose_fit_tiles(tiles_of("eee"), 4, seed=7, annotations=Path("raw/annotations.csv"))


def test_process_tile_writes_the_tile_and_its_mask_and_reports_degenerate_tiles(tmp_path: Path) -> None:
    hematoxylin, eosin, _ = concentration_fields(48, seed=1)
    stained = render(hematoxylin, eosin, STAINS_A, seed=1)
    write_png(tmp_path / "raw" / "stained.png", stained)
    write_png(tmp_path / "raw" / "white.png", np.full((48, 48, 3), 250, np.uint8))
    for folder in ("images", "tissue"):
        (tmp_path / "out" / folder).mkdir(parents=True)
    config = NormalizeParams(workers=1)
    job = NormalizeJob(tmp_path / "raw", tmp_path / "out", fit_stain_reference([stained]), config)
    outcome = process_tile("stained.png", job)
    assert outcome.normalized and outcome.reason == ""
    mask = read_mask(tmp_path / "out" / "tissue" / "stained.png")
    assert np.array_equal(mask, tissue_mask(stained, **recorded_settings(config)["tissue"]))
    assert outcome.tissue_fraction == pytest.approx(mask.mean())
    assert outcome.density_before.shape == (3,) and outcome.features_after.shape == (27,)
    white = process_tile("white.png", job)
    assert not white.normalized and white.reason.startswith("too little tissue")
    assert np.array_equal(read_rgb(tmp_path / "out" / "images" / "white.png"), read_rgb(tmp_path / "raw" / "white.png"))


def outcome(name: str, normalized: bool, density: float, tissue: float = 0.5) -> TileOutcome:
    features = np.full(27, density)
    return TileOutcome(
        name,
        normalized,
        "" if normalized else "one colour",
        tissue,
        np.full(3, density),
        np.full(3, 1.0),
        features,
        features,
    )


def test_summary_counts_degenerate_tiles_and_the_spread_of_optical_density() -> None:
    tiles = tiles_of("rrre")
    outcomes = [
        outcome("t00.png", True, 0.2),
        outcome("t01.png", False, 0.4, tissue=0.0),
        outcome("t02.png", True, 0.6),
        outcome("t03.png", True, 0.8, tissue=1.0),
    ]
    metrics = summarize(outcomes, tiles, NormalizeParams())
    assert metrics["tiles"] == 4 and metrics["normalized"] == 3
    assert metrics["degenerate"] == {"count": 1, "fraction": 0.25, "tiles": ["t01.png"]}
    assert metrics["tissue"]["fraction_mean"] == pytest.approx(0.5)
    assert metrics["optical_density"]["mean_std_before"] == pytest.approx(np.std([0.2, 0.4, 0.6, 0.8]))
    assert metrics["optical_density"]["mean_std_after"] == 0.0
    assert metrics["optical_density"]["mean_before"] == pytest.approx(0.5)
    assert "colour_separability" not in metrics  # 3 train tiles: fewer than 5 per class
    none = summarize(outcomes, tiles, NormalizeParams(method="none"))
    assert none["method"] == "none" and none["degenerate"]["count"] == 0
