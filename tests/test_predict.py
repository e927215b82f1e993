"""The predict command: outputs for tiles and a large image, stitching, tissue masking, unreadable files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from weakseg import predict, tile_preparation
from weakseg.io import read_gray, read_mask, read_rgb, write_png
from weakseg.models import build_classifier, build_segmenter, save_checkpoint
from weakseg.stain import StainReference, save_stain_reference
from weakseg.training.common import preprocessing_record

TILE = 64
LOGIT = 3.0  # the constant model's pixel logit: p = sigmoid(3) ~ 0.953, stored as 243 in the 8-bit map
PURPLE = np.array([150, 80, 160], dtype=np.uint8)
DEFAULT_SETTINGS = {
    "tissue": tile_preparation.default_normalization().tissue,
    "min_tissue_fraction": tile_preparation.default_normalization().min_tissue_fraction,
}


def _constant_segmenter(path: Path) -> None:
    """A segmenter whose pixel output is the same logit everywhere (its last convolution is a bias only)."""
    torch.manual_seed(0)
    model = build_segmenter("resnet18")
    with torch.no_grad():
        model.network.segmentation_head[0].weight.zero_()
        model.network.segmentation_head[0].bias.fill_(LOGIT)
    save_checkpoint(
        path, "segmenter", "resnet18", model, preprocessing=preprocessing_record(TILE), positive_label="SSA"
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A constant-output segmenter and an untrained classifier (tile size 64), built once per module."""
    folder = tmp_path_factory.mktemp("models")
    paths = {"segmenter": folder / "segmenter.pt", "classifier": folder / "classifier.pt"}
    _constant_segmenter(paths["segmenter"])
    torch.manual_seed(1)
    save_checkpoint(
        paths["classifier"],
        "classifier",
        "resnet18",
        build_classifier("resnet18"),
        preprocessing=preprocessing_record(TILE),
    )
    return paths


def _tissue_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Purple tissue with texture on the left, white glass on the right third."""
    image = np.clip(PURPLE.astype(int) + rng.integers(-20, 21, (height, width, 3)), 0, 255).astype(np.uint8)
    image[:, 2 * width // 3 :] = 255
    return image


def _predict_argv(
    inputs: Path, output: Path, segmenter: Path, *extra: str, stain_reference: str | Path = "none"
) -> list[str]:
    """The command line of ``weakseg-predict`` on the CPU, with ``extra`` options after the common ones."""
    return [
        "--input",
        str(inputs),
        "--output",
        str(output),
        "--segmenter",
        str(segmenter),
        "--stain-reference",
        str(stain_reference),
        "--device",
        "cpu",
        *extra,
    ]


def _read_rows(output: Path) -> dict[str, dict[str, str]]:
    with (output / "predictions.csv").open(newline="") as handle:
        return {row["image"]: row for row in csv.DictReader(handle)}


def test_predict_tiles_and_a_large_image(tmp_path: Path, models: dict[str, Path], rng: np.random.Generator) -> None:
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for index, size in enumerate([(TILE, TILE), (40, 50), (TILE, TILE)]):
        write_png(inputs / f"tile_{index}.png", _tissue_image(*size, rng))
    write_png(inputs / "large.png", _tissue_image(500, 600, rng))
    (inputs / "notes.txt").write_text("not an image, ignored")

    status = predict.main(_predict_argv(inputs, output, models["segmenter"], "--batch-size", "5", "--overlap", "16"))
    assert status == 0
    rows = _read_rows(output)
    assert sorted(rows) == ["large.png", "tile_0.png", "tile_1.png", "tile_2.png"]
    expected_windows = (int(np.ceil((500 - TILE) / 48)) + 1) * (int(np.ceil((600 - TILE) / 48)) + 1)
    assert (rows["large.png"]["width"], rows["large.png"]["height"], rows["large.png"]["windows"]) == (
        "600",
        "500",
        str(expected_windows),
    )
    assert rows["tile_1.png"]["width"] == "50" and rows["tile_1.png"]["height"] == "40"
    assert {row["tile_probability_source"] for row in rows.values()} == {"head"}
    assert {row["stain_normalized"] for row in rows.values()} == {"0"}  # --stain-reference none

    probability = read_gray(output / "probabilities" / "large.png")
    mask = read_mask(output / "masks" / "large.png")
    assert probability.shape == mask.shape == (500, 600)
    # Seamless: the constant model gives one value everywhere, window borders included.
    assert np.unique(probability).tolist() == [round(255 / (1 + np.exp(-LOGIT)))]
    # The mask is the (all-above-threshold) probability restricted to tissue: the white third is empty.
    assert not mask[:, 2 * 600 // 3 + 2 :].any()
    assert mask[:, : 2 * 600 // 3 - 2].all()
    assert int(rows["large.png"]["predicted_area_pixels"]) == int(mask.sum())
    assert read_rgb(output / "overlays" / "large.png").shape == (500, 600, 3)
    uncertainty = read_rgb(output / "uncertainty" / "large.png")
    assert uncertainty.shape == (500, 600, 3) and len(np.unique(uncertainty.reshape(-1, 3), axis=0)) == 1
    assert read_gray(output / "probabilities" / "tile_1.png").shape == (40, 50)


def test_unreadable_file_is_named_skipped_and_fails_the_run(
    tmp_path: Path, models: dict[str, Path], rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    write_png(inputs / "a.png", _tissue_image(TILE, TILE, rng))
    (inputs / "broken.png").write_bytes(b"\x89PNG truncated")
    write_png(inputs / "c.png", _tissue_image(TILE, TILE, rng))
    reference = StainReference(np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]), np.array([1.9, 1.0]))
    save_stain_reference(tmp_path / "reference.json", reference, settings=DEFAULT_SETTINGS)

    status = predict.main(
        _predict_argv(
            inputs,
            output,
            models["segmenter"],
            "--classifier",
            str(models["classifier"]),
            "--no-tissue-mask",
            stain_reference=tmp_path / "reference.json",
        )
    )
    assert status == predict.EXIT_SKIPPED
    assert "broken.png" in capsys.readouterr().err
    rows = _read_rows(output)
    assert sorted(rows) == ["a.png", "c.png"]
    assert {row["tile_probability_source"] for row in rows.values()} == {"classifier"}
    assert {row["stain_normalized"] for row in rows.values()} == {"1"}  # the reference was applied
    assert all(0.0 < float(row["tile_probability"]) < 1.0 for row in rows.values())
    # Without tissue masking, the constant model marks every pixel.
    assert read_mask(output / "masks" / "c.png").all()
    assert not (output / "masks" / "broken.png").exists()


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--overlap", "64"], "--overlap"),
        (["--threshold", "1.5"], "--threshold"),
        (["--stain-reference", "missing.json"], "missing.json"),
        (["--segmenter", "nowhere.pt"], "nowhere.pt"),
    ],
)
def test_bad_options_exit_2_naming_the_option(
    tmp_path: Path, models: dict[str, Path], extra: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_png(inputs / "a.png", np.zeros((TILE, TILE, 3), dtype=np.uint8))
    argv = _predict_argv(inputs, tmp_path / "out", models["segmenter"], *extra)
    assert predict.main(argv) == predict.EXIT_USER_ERROR
    assert named in capsys.readouterr().err


# ----------------------------------------------------------------- tiles prepared as normalize did
NON_DEFAULT_TISSUE = {
    "threshold_min": 0.3,
    "threshold_max": 0.6,
    "min_green_excess": 0.2,
    "min_object_size": 16,
    "min_hole_size": 16,
}
NON_DEFAULT_MIN_TISSUE_FRACTION = 0.4


@pytest.fixture
def normalized_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The normalize stage run with non-default tissue settings on stain-A tiles and one stain-B tile.

    The stain-B tile has about 12 % stained pixels: normalized under the default ``min_tissue_fraction``
    (0.05), passed through under the recorded 0.4.
    """
    from stages.normalize import run as normalize_run
    from tests.test_normalize_stage import write_annotations, write_params
    from tests.test_stain import STAINS_A, STAINS_B, concentration_fields, render
    from weakseg.stage import run_stage

    monkeypatch.chdir(tmp_path)
    images = tmp_path / "data/raw/images"
    images.mkdir(parents=True)
    rows = []
    for index in range(4):
        hematoxylin, eosin, _ = concentration_fields(48, seed=100 + index)
        stains = STAINS_B if index == 0 else STAINS_A
        write_png(
            images / f"train_{index}.png", render(hematoxylin, eosin, stains, seed=index, strength=0.8 + 0.1 * index)
        )
        rows.append((f"train_{index}.png", "SSA" if index % 2 else "HP", "train"))
    write_annotations(tmp_path / "data/raw/annotations.csv", rows)
    write_params(
        tmp_path, min_tissue_fraction=NON_DEFAULT_MIN_TISSUE_FRACTION, tissue=NON_DEFAULT_TISSUE, figure_tiles=0
    )
    assert run_stage("normalize", normalize_run, argv=[]) == 0
    return tmp_path


def test_predict_prepares_tiles_exactly_as_the_normalize_stage_did(normalized_project: Path) -> None:
    normalized = normalized_project / "data/normalized"
    recorded = tile_preparation.load_normalization(normalized / "stain_reference.json")
    assert recorded.min_tissue_fraction == NON_DEFAULT_MIN_TISSUE_FRACTION
    assert {key: recorded.tissue[key] for key in NON_DEFAULT_TISSUE} == NON_DEFAULT_TISSUE
    # What predict used before: the reference, but the default tissue settings and min_tissue_fraction.
    defaults = tile_preparation.default_normalization()
    with_defaults = tile_preparation.TileNormalization(
        recorded.reference, defaults.tissue, defaults.min_tissue_fraction, "defaults"
    )
    passed_through = 0
    for index in range(4):
        name = f"train_{index}.png"
        raw = read_rgb(normalized_project / "data/raw/images" / name)
        prepared = tile_preparation.prepare_image(raw, name, recorded)
        stage_tile = read_rgb(normalized / "images" / name)
        stage_mask = read_mask(normalized / "tissue" / name)
        assert prepared.normalized.dtype == stage_tile.dtype and np.array_equal(prepared.normalized, stage_tile), name
        assert prepared.tissue is not None and np.array_equal(prepared.tissue, stage_mask), name
        passed_through += int(not prepared.stain_normalized)
        # The settings matter: the default ones would give another mask on every tile.
        old = tile_preparation.prepare_image(raw, name, with_defaults)
        assert old.tissue is not None and not np.array_equal(old.tissue, stage_mask), name
        if index == 0:  # ... and would have normalized the tile the recorded 0.4 passes through
            assert old.stain_normalized and not prepared.stain_normalized
            assert not np.array_equal(old.normalized, stage_tile)
    assert passed_through == 1


def test_the_command_uses_the_recorded_tissue_settings(normalized_project: Path, models: dict[str, Path]) -> None:
    output = normalized_project / "out"
    reference = normalized_project / "data/normalized/stain_reference.json"
    status = predict.main(
        _predict_argv(normalized_project / "data/raw/images", output, models["segmenter"], stain_reference=reference)
    )
    assert status == 0
    rows = _read_rows(output)
    for index in range(4):
        name = f"train_{index}.png"
        stage_mask = read_mask(normalized_project / "data/normalized/tissue" / name)
        assert rows[name]["tissue_fraction"] == f"{float(stage_mask.mean()):.6f}"
        # The constant model is above 0.5 everywhere, so the mask is the tissue mask.
        assert np.array_equal(read_mask(output / "masks" / name), stage_mask)
    assert rows["train_0.png"]["stain_normalized"] == "0"


# ------------------------------------------------------------------------- head tile threshold
HEAD_PROBABILITY = 0.7


def _segmenter_with_head(path: Path, head_threshold: float | None) -> None:
    """The constant segmenter, its head fixed at probability 0.7, with ``head_threshold`` stored (or none)."""
    torch.manual_seed(0)
    model = build_segmenter("resnet18")
    linear = [module for module in model.network.classification_head.modules() if isinstance(module, torch.nn.Linear)][
        0
    ]
    with torch.no_grad():
        model.network.segmentation_head[0].weight.zero_()
        model.network.segmentation_head[0].bias.fill_(LOGIT)
        linear.weight.zero_()
        linear.bias.fill_(float(np.log(HEAD_PROBABILITY / (1 - HEAD_PROBABILITY))))
    extra = {} if head_threshold is None else {"head_threshold": head_threshold}
    save_checkpoint(path, "segmenter", "resnet18", model, preprocessing=preprocessing_record(TILE), **extra)


def test_head_tile_decision_uses_the_checkpoint_threshold(
    tmp_path: Path, rng: np.random.Generator, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_png(inputs / "a.png", _tissue_image(TILE, TILE, rng))
    decisions = {}
    for name, stored in (("calibrated", 0.9), ("old", None)):
        _segmenter_with_head(tmp_path / f"{name}.pt", stored)
        argv = _predict_argv(inputs, tmp_path / name, tmp_path / f"{name}.pt")
        with caplog.at_level("WARNING", logger="weakseg.inference"):
            assert predict.main(argv) == 0
        decisions[name] = _read_rows(tmp_path / name)["a.png"]
    calibrated = decisions["calibrated"]
    assert float(calibrated["tile_probability"]) == pytest.approx(HEAD_PROBABILITY, abs=1e-4)
    # 0.7 is below the stored 0.9: negative, although it is above --threshold (0.5).
    assert (calibrated["tile_threshold"], calibrated["tile_positive"]) == ("0.900000", "0")
    # A checkpoint from before the threshold was stored: 0.5, with a warning naming the file.
    assert (decisions["old"]["tile_threshold"], decisions["old"]["tile_positive"]) == ("0.500000", "1")
    assert any("old.pt" in record.getMessage() and "head_threshold" in record.getMessage() for record in caplog.records)
    assert not any("calibrated.pt" in record.getMessage() for record in caplog.records)


def test_gate_option_is_parsed() -> None:
    assert predict.parse_options(["--input", "a", "--output", "b", "--gate"]).gate
    assert not predict.parse_options(["--input", "a", "--output", "b"]).gate


def test_fill_holes_option_is_parsed() -> None:
    assert predict.parse_options(["--input", "a", "--output", "b", "--fill-holes"]).fill_holes
    assert not predict.parse_options(["--input", "a", "--output", "b"]).fill_holes


def test_test_time_augmentation_option_is_parsed_and_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert predict.parse_options(["--input", "a", "--output", "b"]).test_time_augmentation == "none"
    options = predict.parse_options(["--input", "a", "--output", "b", "--test-time-augmentation", "dihedral"])
    assert options.test_time_augmentation == "dihedral"
    with pytest.raises(SystemExit):
        predict.parse_options(["--input", "a", "--output", "b", "--test-time-augmentation", "flips"])
    assert "--test-time-augmentation" in capsys.readouterr().err


# -------------------------------------------------------------------- classifier decision threshold
def _constant_classifier(path: Path, probability: float, decision_threshold: float | None) -> None:
    """A classifier of constant ``probability``, with ``decision_threshold`` stored (or none)."""
    torch.manual_seed(0)
    model = build_classifier("resnet18")
    head = model.fc
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(float(np.log(probability / (1 - probability))))
    extra = {} if decision_threshold is None else {"decision_threshold": decision_threshold}
    save_checkpoint(path, "classifier", "resnet18", model, preprocessing=preprocessing_record(TILE), **extra)


def test_classifier_tile_decision_uses_its_checkpoint_threshold(
    tmp_path: Path, models: dict[str, Path], rng: np.random.Generator
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_png(inputs / "a.png", _tissue_image(TILE, TILE, rng))
    _constant_classifier(tmp_path / "classifier.pt", 0.7, 0.8)
    argv = _predict_argv(
        inputs, tmp_path / "out", models["segmenter"], "--classifier", str(tmp_path / "classifier.pt"), "--gate"
    )
    assert predict.main(argv) == 0
    row = _read_rows(tmp_path / "out")["a.png"]
    assert row["tile_probability_source"] == "classifier"
    assert float(row["tile_probability"]) == pytest.approx(0.7, abs=1e-4)
    # 0.7 is above --threshold (0.5, the pixels') but below the stored 0.8: negative, and the gate empties the mask.
    assert (row["tile_threshold"], row["tile_positive"], row["predicted_area_pixels"]) == ("0.800000", "0", "0")


def test_the_gate_of_both_models_decides_on_the_lower_probability(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    """--classifier-and-head-threshold: the decision is the lower of the two probabilities (the head's 0.7 here,
    the classifier's 0.95) at that cut: 0.6 passes the tile, 0.8 empties its mask although the classifier
    alone clears its own stored cut (0.5)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_png(inputs / "a.png", _tissue_image(TILE, TILE, rng))
    _segmenter_with_head(tmp_path / "segmenter.pt", 0.5)
    _constant_classifier(tmp_path / "classifier.pt", 0.95, 0.5)
    rows = {}
    for cut in ("0.6", "0.8"):
        argv = _predict_argv(
            inputs,
            tmp_path / cut,
            tmp_path / "segmenter.pt",
            "--classifier",
            str(tmp_path / "classifier.pt"),
            "--gate",
            "--classifier-and-head-threshold",
            cut,
        )
        assert predict.main(argv) == 0
        rows[cut] = _read_rows(tmp_path / cut)["a.png"]
    for cut, row in rows.items():
        assert row["tile_probability_source"] == "classifier_and_head"
        assert float(row["tile_probability"]) == pytest.approx(HEAD_PROBABILITY, abs=1e-4)
        assert float(row["tile_threshold"]) == float(cut)
    assert rows["0.6"]["tile_positive"] == "1" and int(rows["0.6"]["predicted_area_pixels"]) > 0
    assert (rows["0.8"]["tile_positive"], rows["0.8"]["predicted_area_pixels"]) == ("0", "0")
    # The cut needs the classifier and a probability's range.
    for extra, named in (
        (["--classifier-and-head-threshold", "0.6"], "needs --classifier"),
        (["--classifier", "c.pt", "--classifier-and-head-threshold", "1.5"], "between 0 and 1"),
    ):
        assert predict.main(_predict_argv(inputs, tmp_path / "bad", tmp_path / "segmenter.pt", *extra)) == 2
        assert named in capsys.readouterr().err
