"""The evaluate stage end to end on a tiny hand-made test partition (its metric rows: test_evaluation.py)."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages import evaluate
from tests.metric_keys import contract_names as pipeline_metric_names
from weakseg import figures, metrics
from weakseg.data.layout import Tile, write_annotations
from weakseg.io import write_png
from weakseg.models import build_classifier, build_segmenter, save_checkpoint
from weakseg.stage import run_stage
from weakseg.training.common import preprocessing_record

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TILE = 32


def _lookup(document: dict, dotted: str) -> object:
    value: object = document
    for part in dotted.split("."):
        assert isinstance(value, dict) and part in value, f"missing {dotted}"
        value = value[part]
    return value


def _square(offset: int) -> np.ndarray:
    mask = np.zeros((TILE, TILE), dtype=bool)
    mask[offset : offset + 12, offset : offset + 14] = True
    return mask


def _build_project(root: Path, with_truth: bool, positive_label: str = "SSA") -> list[Tile]:
    """A project folder holding exactly what evaluate reads; every train-partition file but its normalized
    image is corrupt (the gate of both models reads the validation tiles' images, nothing else of train)."""
    rng = np.random.default_rng(7)
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["evaluate"].update({"figure_tiles": 2, "batch_size": 3, "device": "cpu", "min_foreground_pixels": 10})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    # generate_cams' estimate, which refine.threshold_quantile: auto builds on: 0.3 + the 0.2 band = 0.5.
    (root / "metrics").mkdir()
    (root / "metrics" / "cams.json").write_text(json.dumps({"normal_tissue_fraction": 0.3}))
    tiles = [Tile(f"test_{i}.png", "SSA" if i < 3 else "HP", "test", i < 3) for i in range(6)]
    tiles += [Tile(f"train_{i}.png", "SSA" if i % 2 else "HP", "train", bool(i % 2)) for i in range(4)]
    folders = ["data/normalized/images", "data/normalized/tissue", "data/cams", "data/pseudo_masks"]
    if with_truth:
        folders.append("data/raw/masks")
    for folder in folders:
        (root / folder).mkdir(parents=True)
    write_annotations(root / "data/normalized/annotations.csv", tiles)
    for index, tile in enumerate(tiles):
        if tile.partition == "train":
            for folder in folders[1:]:  # evaluate must never open these
                (root / folder / tile.name).write_bytes(b"not a png")
            write_png(root / folders[0] / tile.name, rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8))
            continue
        truth = _square(4 + index) if tile.positive else np.zeros((TILE, TILE), dtype=bool)
        write_png(root / "data/normalized/images" / tile.name, rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8))
        write_png(root / "data/normalized/tissue" / tile.name, np.ones((TILE, TILE), dtype=bool))
        cam = np.zeros((TILE, TILE), dtype=np.uint8)
        cam[truth] = 200
        write_png(root / "data/cams" / tile.name, cam)
        write_png(root / "data/pseudo_masks" / tile.name, truth)
        if with_truth:
            write_png(root / "data/raw/masks" / tile.name, truth)
    (root / "models").mkdir()
    torch.manual_seed(0)
    extra = {"preprocessing": preprocessing_record(TILE), "positive_label": positive_label, "negative_label": "HP"}
    save_checkpoint(root / "models/classifier.pt", "classifier", "resnet18", build_classifier("resnet18"), **extra)
    save_checkpoint(root / "models/segmenter.pt", "segmenter", "resnet18", build_segmenter("resnet18"), **extra)
    return tiles


class _FakeRun:
    """Stands in for an MLflow run (a fresh SQLite store costs seconds) and records what is logged."""

    def __init__(self) -> None:
        self.metrics: dict = {}
        self.artifacts: list[str] = []

    def log_metrics(self, metrics: dict, **_: object) -> None:
        self.metrics.update(metrics)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.artifacts.append(f"{folder}/{Path(path).name}")


@pytest.fixture
def fake_tracking(monkeypatch: pytest.MonkeyPatch) -> _FakeRun:
    """Replaces the stage's MLflow run with a recorder."""
    import contextlib

    run = _FakeRun()

    @contextlib.contextmanager
    def fake_stage_run(stage: str, params: object = None) -> Iterator[_FakeRun]:
        assert stage == "evaluate"
        yield run

    monkeypatch.setattr(evaluate, "stage_run", fake_stage_run)
    return run


@pytest.fixture
def titles(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Records the title of every figure the stage saves, by file name."""
    recorded: dict[str, str] = {}
    original = figures.save_figure

    def recording(path: Path, rows: list, **options: object) -> None:
        recorded[Path(path).name] = str(options.get("title"))
        original(path, rows, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(figures, "save_figure", recording)
    return recorded


def test_evaluate_with_truth_writes_every_metric_and_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, titles: dict[str, str], fake_tracking: _FakeRun
) -> None:
    _build_project(tmp_path, with_truth=True)
    monkeypatch.chdir(tmp_path)
    assert run_stage("evaluate", evaluate.run, argv=[]) == 0

    result = json.loads(Path("metrics/evaluate.json").read_text())
    names = pipeline_metric_names()
    assert "segmenter.vs_truth.iou_positive_mean" in names and "cam.vs_truth.dice" in names
    for name in names:
        value = _lookup(result, name)
        assert isinstance(value, float) and 0.0 <= value <= 1.0, name
    for decision in ("head", "area"):
        for key in ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity"):
            assert 0.0 <= _lookup(result, f"segmenter_tile.{decision}.{key}") <= 1.0  # type: ignore[operator]
    # Pseudo-masks equal the truth here, and the CAM is bright exactly on it: both score perfectly.
    assert result["pseudo"]["vs_truth"]["iou"] == 1.0
    assert result["cam"]["vs_truth"]["iou"] == 1.0
    tile_counts = dict(result["tiles"])
    assert 0 <= tile_counts.pop("classified_positive") <= 6
    assert tile_counts == {"test": 6, "positive": 3, "negative": 3, "with_truth": 6}
    for oracle in ("cam_oracle_label", "pseudo_oracle_label", "baseline.tissue_if_label_positive_oracle_label"):
        assert 0.0 <= _lookup(result, f"{oracle}.vs_truth.iou") <= 1.0  # type: ignore[operator]

    with open("metrics/roc.csv", newline="") as handle:
        roc = list(csv.DictReader(handle))
    assert list(roc[0]) == ["fpr", "tpr", "threshold"]
    assert (float(roc[0]["fpr"]), float(roc[-1]["tpr"])) == (0.0, 1.0)
    with open("metrics/confusion.csv", newline="") as handle:
        confusion = list(csv.DictReader(handle))
    assert len(confusion) == 6
    assert sorted(row["actual"] for row in confusion) == ["HP"] * 3 + ["SSA"] * 3
    assert {row["predicted"] for row in confusion} <= {"HP", "SSA"}

    written = sorted(path.name for path in Path("figures/evaluate").glob("*.png"))
    assert written == ["error_maps.png", "overlays.png", "roc_curves.png", "uncertainty.png"]
    assert "against true masks" in titles["error_maps.png"]
    assert fake_tracking.metrics == result
    assert {f"figures/{name}" for name in written} <= set(fake_tracking.artifacts)


@pytest.mark.integration
def test_evaluate_logs_an_mlflow_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real MLflow store (a fresh SQLite file: slow to create, so once here)."""
    _build_project(tmp_path, with_truth=True)
    monkeypatch.chdir(tmp_path)
    assert run_stage("evaluate", evaluate.run, argv=[]) == 0
    result = json.loads(Path("metrics/evaluate.json").read_text())
    import mlflow

    runs = mlflow.search_runs(experiment_names=["weakseg"], filter_string="tags.`weakseg.stage` = 'evaluate'")
    assert len(runs) == 1
    assert runs["metrics.classifier.auc"].iloc[0] == pytest.approx(result["classifier"]["auc"])
    assert runs["metrics.cam.vs_truth.iou"].iloc[0] == pytest.approx(1.0)
    artifacts = mlflow.MlflowClient().list_artifacts(runs["run_id"].iloc[0], "figures")
    assert {Path(item.path).name for item in artifacts} == {
        "error_maps.png",
        "overlays.png",
        "roc_curves.png",
        "uncertainty.png",
    }


def test_evaluate_without_truth_omits_vs_truth_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, titles: dict[str, str], fake_tracking: _FakeRun
) -> None:
    _build_project(tmp_path, with_truth=False)
    monkeypatch.chdir(tmp_path)
    assert run_stage("evaluate", evaluate.run, argv=[]) == 0
    result = json.loads(Path("metrics/evaluate.json").read_text())
    assert "vs_truth" not in result["segmenter"]
    assert "cam" not in result and "pseudo" not in result
    assert set(result["segmenter"]["vs_pseudo"]) >= {"iou", "miou", "dice", "iou_positive_mean"}
    assert "against pseudo-masks" in titles["error_maps.png"]
    assert fake_tracking.metrics["segmenter"]["vs_pseudo"] == result["segmenter"]["vs_pseudo"]
    assert "metrics/evaluate.json" in fake_tracking.artifacts and "figures/error_maps.png" in fake_tracking.artifacts


def test_evaluate_refuses_a_model_of_another_positive_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fake_tracking: _FakeRun
) -> None:
    _build_project(tmp_path, with_truth=False, positive_label="HGIN")
    monkeypatch.chdir(tmp_path)
    assert run_stage("evaluate", evaluate.run, argv=[]) == 2
    assert "classifier.pt" in capsys.readouterr().err
    assert not Path("metrics/evaluate.json").exists()


def test_stage_reads_the_head_threshold_from_the_segmenter_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_tracking: _FakeRun
) -> None:
    _build_project(tmp_path, with_truth=False)
    path = tmp_path / "models/segmenter.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    torch.save({**payload, "head_threshold": 0.73}, path)
    monkeypatch.chdir(tmp_path)
    assert run_stage("evaluate", evaluate.run, argv=[]) == 0
    result = json.loads(Path("metrics/evaluate.json").read_text())
    assert result["segmenter_tile"]["head"]["threshold"] == 0.73
    assert result["settings"]["threshold"] == 0.5


def test_the_classifier_gate_empties_the_segmenter_mask_of_tiles_called_negative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_tracking: _FakeRun
) -> None:
    """With evaluate.segmenter_gate: classifier, a tile the classifier calls negative has an empty mask;
    both variants are reported whichever gate is configured."""
    _build_project(tmp_path, with_truth=True)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    results = {}
    # The classifier decides at its checkpoint's decision_threshold (evaluate.threshold is the pixels').
    for gate, threshold in (("none", 0.5), ("classifier", 0.5), ("classifier", 0.999)):
        params["evaluate"].update({"segmenter_gate": gate})
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        _store_classifier(tmp_path, decision_threshold=threshold)
        assert run_stage("evaluate", evaluate.run, argv=[]) == 0
        results[(gate, threshold)] = json.loads(Path("metrics/evaluate.json").read_text())
    ungated, gated, strict = results[("none", 0.5)], results[("classifier", 0.5)], results[("classifier", 0.999)]
    assert gated["settings"]["segmenter_gate"] == "classifier"
    for result in (ungated, gated):
        assert result["segmenter_ungated"]["vs_truth"] == ungated["segmenter"]["vs_truth"]
        assert result["segmenter_classifier_gated"]["vs_truth"] == gated["segmenter"]["vs_truth"]
    # A classifier that calls every tile negative (threshold 0.999 on an untrained one) empties every mask.
    assert strict["tiles"]["classified_positive"] == 0
    assert strict["segmenter"]["vs_truth"]["iou"] == 0.0
    assert strict["segmenter_ungated"]["vs_truth"]["iou"] == pytest.approx(ungated["segmenter"]["vs_truth"]["iou"])


def test_fill_holes_adds_the_lumens_the_tissue_restriction_leaves_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_tracking: _FakeRun
) -> None:
    """With every pixel above the threshold the mask is the tissue; evaluate.fill_holes adds its lumen."""
    tiles = _build_project(tmp_path, with_truth=True)
    tissue = np.ones((TILE, TILE), dtype=bool)
    tissue[10:14, 10:14] = False  # inside every test tile's true square
    for tile in tiles:
        if tile.partition == "test":
            write_png(tmp_path / "data/normalized/tissue" / tile.name, tissue)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    results = {}
    for fill in (False, True):
        params["evaluate"].update({"segmenter_gate": "none", "threshold": 1e-9, "fill_holes": fill})
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        assert run_stage("evaluate", evaluate.run, argv=[]) == 0
        results[fill] = json.loads(Path("metrics/evaluate.json").read_text())
    truths = [_square(4 + index) for index, tile in enumerate(tiles) if tile.partition == "test" and tile.positive]
    lesion = sum(int(truth.sum()) for truth in truths)
    test_pixels = sum(tile.partition == "test" for tile in tiles) * TILE * TILE
    lumen_in_lesion = 16 * len(truths)
    # Kept: the tissue of every tile, without the lumens (those of the lesions missed); filled: every pixel.
    lumens = 16 * sum(tile.partition == "test" for tile in tiles)
    kept_iou = (lesion - lumen_in_lesion) / (test_pixels - lumens + lumen_in_lesion)
    assert results[False]["segmenter"]["vs_truth"]["iou"] == pytest.approx(kept_iou)
    assert results[True]["segmenter"]["vs_truth"]["iou"] == pytest.approx(lesion / test_pixels)
    assert results[True]["segmenter"]["vs_truth"]["iou"] != pytest.approx(kept_iou)


# ------------------------------------------------------------------ the gate of both models
def _store_head(root: Path, probability: float) -> None:
    """Makes the project's segmenter head constant: ``probability`` for every tile."""
    path = root / "models/segmenter.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    state = payload["state_dict"]
    state["network.classification_head.3.weight"] = torch.zeros_like(state["network.classification_head.3.weight"])
    state["network.classification_head.3.bias"] = torch.full_like(
        state["network.classification_head.3.bias"], float(np.log(probability / (1 - probability)))
    )
    torch.save(payload, path)


def test_the_gate_of_both_models_cuts_their_lower_probability_where_validation_places_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_tracking: _FakeRun
) -> None:
    """evaluate.segmenter_gate classifier_and_head: the cut is chosen on the validation split's tiles (one of
    each class here; never a test tile) from both models' probabilities, and a tile passes only where the
    lower of the two reaches it, whichever model is the lower one."""
    from weakseg import evaluation_inputs

    _build_project(tmp_path, with_truth=True)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["evaluate"].update({"segmenter_gate": "classifier_and_head", "threshold": 1e-9})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    calls: list[tuple] = []
    forced: list[float] = []
    real_choice = evaluation_inputs.choose_joint_gate_threshold

    def recording_choice(
        labels: Sequence[bool],
        classifier_probabilities: Sequence[float],
        head_probabilities: Sequence[float],
        rule: str,
    ) -> metrics.ThresholdChoice:
        calls.append((list(labels), list(classifier_probabilities), list(head_probabilities), rule))
        choice = real_choice(labels, classifier_probabilities, head_probabilities, rule)
        return metrics.ThresholdChoice(forced[-1]) if forced else choice

    monkeypatch.setattr(evaluation_inputs, "choose_joint_gate_threshold", recording_choice)
    results = {}
    for classifier, head, cut in ((0.7, 0.9, None), (0.7, 0.9, 0.8), (0.9, 0.7, 0.8), (0.9, 0.85, 0.8)):
        _store_classifier(tmp_path, decision_threshold=0.5, probability=classifier)
        _store_head(tmp_path, head)
        if cut is not None:
            forced.append(cut)
        assert run_stage("evaluate", evaluate.run, argv=[]) == 0
        results[(classifier, head, cut)] = json.loads(Path("metrics/evaluate.json").read_text())
    labels, classifier_probabilities, head_probabilities, rule = calls[0]
    assert sorted(labels) == [False, True] and rule == params["classifier"]["decision_rule"]
    assert classifier_probabilities == pytest.approx([0.7, 0.7], abs=1e-5)
    assert head_probabilities == pytest.approx([0.9, 0.9], abs=1e-5)
    # Equal validation scores: no cut beats chance, 0.5 is kept, and every test tile (0.7) passes.
    chosen = results[(0.7, 0.9, None)]
    assert chosen["classifier_and_head"]["threshold"] == 0.5
    assert chosen["segmenter"]["vs_truth"] == chosen["segmenter_ungated"]["vs_truth"]
    assert chosen["segmenter"]["vs_truth"]["iou"] > 0.0
    for blocked in (results[(0.7, 0.9, 0.8)], results[(0.9, 0.7, 0.8)]):  # the classifier, then the head is lower
        assert blocked["classifier_and_head"]["threshold"] == 0.8
        assert blocked["segmenter"]["vs_truth"]["iou"] == 0.0
        assert blocked["segmenter_classifier_and_head_gated"]["vs_truth"] == blocked["segmenter"]["vs_truth"]
        assert blocked["baseline"]["tissue_if_classifier_and_head_positive"]["vs_truth"]["iou"] == 0.0
        # Either model alone at its own cut (0.5) would have passed every tile.
        assert blocked["segmenter_classifier_gated"]["vs_truth"] == chosen["segmenter"]["vs_truth"]
    both = results[(0.9, 0.85, 0.8)]
    assert both["segmenter"]["vs_truth"] == chosen["segmenter"]["vs_truth"]
    assert both["classifier_and_head"]["sensitivity"] == 1.0 and both["classifier_and_head"]["specificity"] == 0.0


def test_only_the_gate_of_both_models_reads_train_tiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fake_tracking: _FakeRun
) -> None:
    """With the validation tiles' images corrupt too, the one-model gates run and the gate of both models
    stops with the file's name."""
    _build_project(tmp_path, with_truth=False)
    for index in range(4):
        (tmp_path / f"data/normalized/images/train_{index}.png").write_bytes(b"not a png")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    for gate, status in (("none", 0), ("classifier", 0), ("head", 0), ("classifier_and_head", 2)):
        params["evaluate"]["segmenter_gate"] = gate
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        assert run_stage("evaluate", evaluate.run, argv=[]) == status, gate
    assert "data/normalized/images/train_" in capsys.readouterr().err


# ------------------------------------------------------------------ classifier decision threshold
def _store_classifier(root: Path, decision_threshold: float, probability: float | None = None) -> None:
    """Stores ``decision_threshold`` in the project's classifier checkpoint; with ``probability``, the
    classifier is also made constant (that probability for every tile)."""
    path = root / "models/classifier.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if probability is not None:
        payload["state_dict"]["fc.weight"] = torch.zeros_like(payload["state_dict"]["fc.weight"])
        payload["state_dict"]["fc.bias"] = torch.full_like(
            payload["state_dict"]["fc.bias"], float(np.log(probability / (1 - probability)))
        )
    torch.save({**payload, "decision_threshold": decision_threshold}, path)


def test_stage_gates_by_the_classifier_checkpoint_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_tracking: _FakeRun
) -> None:
    _build_project(tmp_path, with_truth=True)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["evaluate"].update({"segmenter_gate": "classifier", "threshold": 0.5})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    results = {}
    for stored in (0.8, 0.6):  # every tile scores 0.7
        _store_classifier(tmp_path, decision_threshold=stored, probability=0.7)
        assert run_stage("evaluate", evaluate.run, argv=[]) == 0
        results[stored] = json.loads(Path("metrics/evaluate.json").read_text())
        with open("metrics/confusion.csv", newline="") as handle:
            results[stored]["_predicted"] = {row["predicted"] for row in csv.DictReader(handle)}
    strict, lenient = results[0.8], results[0.6]
    assert (strict["classifier"]["threshold"], strict["settings"]["threshold"]) == (0.8, 0.5)
    assert strict["tiles"]["classified_positive"] == 0 and strict["_predicted"] == {"HP"}
    assert strict["segmenter"]["vs_truth"]["iou"] == 0.0  # evaluate.segmenter_gate emptied every mask
    assert strict["cam"]["vs_truth"]["iou"] == 0.0
    assert lenient["tiles"]["classified_positive"] == 6 and lenient["_predicted"] == {"SSA"}
    assert lenient["cam"]["vs_truth"]["iou"] == 1.0


def test_the_pseudo_masks_ignored_band_is_not_foreground(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_tracking: _FakeRun
) -> None:
    """A pseudo-mask's 128 band (refine.background_quantile) is not lesion: read as foreground (read_mask's
    >= 128), it would cost the label-gated pseudo-mask its perfect score against the truth."""
    tiles = _build_project(tmp_path, with_truth=True)
    for index, tile in enumerate(tiles):
        if tile.partition == "test" and tile.positive:
            pixels = np.where(_square(4 + index), 255, 128).astype(np.uint8)  # the rest of the tile ignored
            write_png(tmp_path / "data/pseudo_masks" / tile.name, pixels)
    monkeypatch.chdir(tmp_path)
    assert run_stage("evaluate", evaluate.run, argv=[]) == 0
    result = json.loads(Path("metrics/evaluate.json").read_text())
    assert result["pseudo_oracle_label"]["vs_truth"]["iou"] == 1.0


def test_a_mask_of_another_size_than_its_tile_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fake_tracking: _FakeRun
) -> None:
    _build_project(tmp_path, with_truth=False)
    write_png(tmp_path / "data/cams/test_1.png", np.zeros((TILE // 2, TILE), dtype=np.uint8))
    monkeypatch.chdir(tmp_path)
    assert run_stage("evaluate", evaluate.run, argv=[]) == 2
    expected = f"data/cams/test_1.png: size {TILE}x{TILE // 2} differs from its tile's {TILE}x{TILE}"
    assert expected in capsys.readouterr().err
    assert not Path("metrics/evaluate.json").exists()


def test_the_head_gate_empties_the_segmenter_mask_of_tiles_its_head_calls_negative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_tracking: _FakeRun
) -> None:
    """With evaluate.segmenter_gate: head, the segmenter's own head decides at its checkpoint's threshold:
    a threshold no tile reaches empties every mask; the head-gated row is what the gate outputs."""
    _build_project(tmp_path, with_truth=True)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    path = tmp_path / "models/segmenter.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    monkeypatch.chdir(tmp_path)
    results = {}
    for gate, head_threshold in (("none", 0.5), ("head", 1e-9), ("head", 1 - 1e-9)):
        # A pixel threshold every probability passes: the untrained segmenter marks all tissue.
        params["evaluate"].update({"segmenter_gate": gate, "threshold": 1e-9})
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        torch.save({**payload, "head_threshold": head_threshold}, path)
        assert run_stage("evaluate", evaluate.run, argv=[]) == 0
        results[(gate, head_threshold)] = json.loads(Path("metrics/evaluate.json").read_text())
    ungated, lenient, strict = results[("none", 0.5)], results[("head", 1e-9)], results[("head", 1 - 1e-9)]
    assert strict["settings"]["segmenter_gate"] == "head"
    assert lenient["segmenter"]["vs_truth"] == ungated["segmenter"]["vs_truth"]  # every tile passes
    assert ungated["segmenter"]["vs_truth"]["iou"] > 0.0
    assert strict["segmenter"]["vs_truth"]["iou"] == 0.0  # no head probability of an untrained model is that high
    assert strict["segmenter_head_gated"]["vs_truth"] == strict["segmenter"]["vs_truth"]
    assert strict["segmenter_ungated"]["vs_truth"] == ungated["segmenter"]["vs_truth"]


def test_the_cam_row_uses_the_foreground_quantile_refine_masks_resolved(tmp_path: Path) -> None:
    """A numeric quantile is used as it is; auto is resolved from generate_cams' estimate, or named missing."""
    from weakseg.evaluation import EvaluateInputError
    from weakseg.evaluation_inputs import cam_threshold_quantile
    from weakseg.io import write_json
    from weakseg.params import RefineParams

    estimate = tmp_path / "metrics" / "cams.json"
    assert cam_threshold_quantile(RefineParams(threshold_quantile=0.6), estimate) == 0.6  # nothing read
    fixed_seeds = RefineParams(threshold_quantile="auto", background_quantile=0.1, ignore_band_width=0.3)
    assert cam_threshold_quantile(fixed_seeds, estimate) == pytest.approx(0.4)  # nor here
    automatic = RefineParams(threshold_quantile="auto", background_quantile="auto", ignore_band_width=0.2)
    with pytest.raises(EvaluateInputError, match=r"cams\.json: not found"):
        cam_threshold_quantile(automatic, estimate)
    write_json(estimate, {"normal_tissue_fraction": 0.35})
    assert cam_threshold_quantile(automatic, estimate) == pytest.approx(0.55)
    write_json(estimate, {})
    with pytest.raises(EvaluateInputError, match=r"cams\.json: .*normal_tissue_fraction"):
        cam_threshold_quantile(automatic, estimate)
