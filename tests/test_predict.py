"""The predict command: outputs for tiles and a large image, stitching, tissue masking, unreadable files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from weakseg import predict
from weakseg.io import read_gray, read_mask, read_rgb, write_png
from weakseg.models import build_classifier, build_segmenter, save_checkpoint
from weakseg.stain import StainReference, save_stain_reference
from weakseg.training.common import preprocessing_record

TILE = 64
LOGIT = 3.0  # the constant model's pixel logit: p = sigmoid(3) ~ 0.953, stored as 243 in the 8-bit map
PURPLE = np.array([150, 80, 160], dtype=np.uint8)


def _constant_segmenter(path: Path) -> None:
    """A segmenter whose pixel output is the same logit everywhere (its last convolution is a bias only)."""
    torch.manual_seed(0)
    model = build_segmenter("resnet18")
    with torch.no_grad():
        model.network.segmentation_head[0].weight.zero_()
        model.network.segmentation_head[0].bias.fill_(LOGIT)
    save_checkpoint(path, "segmenter", "resnet18", model, preprocessing=preprocessing_record(TILE), positive_label="SSA")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A constant-output segmenter and an untrained classifier (tile size 64), built once per module."""
    folder = tmp_path_factory.mktemp("models")
    paths = {"segmenter": folder / "segmenter.pt", "classifier": folder / "classifier.pt"}
    _constant_segmenter(paths["segmenter"])
    torch.manual_seed(1)
    save_checkpoint(paths["classifier"], "classifier", "resnet18", build_classifier("resnet18"), preprocessing=preprocessing_record(TILE))
    return paths


def _tissue_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Purple tissue with texture on the left, white glass on the right third."""
    image = np.clip(PURPLE.astype(int) + rng.integers(-20, 21, (height, width, 3)), 0, 255).astype(np.uint8)
    image[:, 2 * width // 3 :] = 255
    return image


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

    status = predict.main(
        ["--input", str(inputs), "--output", str(output), "--segmenter", str(models["segmenter"]),
         "--stain-reference", "none", "--device", "cpu", "--batch-size", "5", "--overlap", "16"]
    )
    assert status == 0
    rows = _read_rows(output)
    assert sorted(rows) == ["large.png", "tile_0.png", "tile_1.png", "tile_2.png"]
    expected_windows = (int(np.ceil((500 - TILE) / 48)) + 1) * (int(np.ceil((600 - TILE) / 48)) + 1)
    assert (rows["large.png"]["width"], rows["large.png"]["height"], rows["large.png"]["windows"]) == ("600", "500", str(expected_windows))
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
    save_stain_reference(tmp_path / "reference.json", reference)

    status = predict.main(
        ["--input", str(inputs), "--output", str(output), "--segmenter", str(models["segmenter"]),
         "--classifier", str(models["classifier"]), "--stain-reference", str(tmp_path / "reference.json"),
         "--device", "cpu", "--no-tissue-mask"]
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
    argv = ["--input", str(inputs), "--output", str(tmp_path / "out"), "--segmenter", str(models["segmenter"]),
            "--stain-reference", "none", "--device", "cpu", *extra]
    assert predict.main(argv) == predict.EXIT_USER_ERROR
    assert named in capsys.readouterr().err


def test_input_folder_problems_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(predict.PredictInputError, match="nothing-here"):
        predict.list_images(tmp_path / "nothing-here")
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(predict.PredictInputError, match="collide"):
        predict.list_images(tmp_path)
