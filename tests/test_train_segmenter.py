"""The train_segmenter stage and its training loop, on tiny seeded tiles."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import yaml

from stages import train_segmenter as stage
from weakseg.data.layout import Tile, read_annotations, write_annotations
from weakseg.inference import load_model
from weakseg.io import write_png
from weakseg.metrics import PixelCounts
from weakseg.params import AugmentParams, CurriculumParams, SegmenterParams, StageParams, declared_params
from weakseg.stage import run_stage
from weakseg.training import segmenter as loop
from weakseg.training import segmenter_validation
from weakseg.training.augment import build_augmentation
from weakseg.training.datasets import TileDataset
from weakseg.training.segmenter_data import SegmenterData, load_segmenter_split
from weakseg.training.segmenter_validation import ValidationResult

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TILE = 32
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_iou", "val_dice", "negative_probability", "lr"]

TINY_SEGMENTER: dict[str, Any] = {
    "encoder": "resnet18",
    "weights": "none",
    "epochs": 2,
    "batch_size": 4,
    "lr": 0.01,
    "curriculum": {"positive_only_epochs": 1, "final_negative_probability": 0.5},
    "early_stopping_patience": 5,
    "device": "cpu",
}


def _tile_and_mask(rng: np.random.Generator, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """A pinkish noisy tile; positive tiles carry a dark blob that is their pseudo-mask."""
    image = np.clip(rng.normal((220, 170, 200), 12, size=(TILE, TILE, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((TILE, TILE), dtype=bool)
    if positive:
        top, left = rng.integers(2, TILE // 2, size=2)
        mask[top : top + TILE // 3, left : left + TILE // 3] = True
        image[mask] = (90, 40, 120)
    return image, mask


def _write_project(root: Path, segmenter: dict | None = None, train_tiles: int = 12) -> None:
    """params.yaml, dvc.yaml, data/normalized and data/pseudo_masks; test images are corrupt files."""
    rng = np.random.default_rng(0)
    tiles: list[Tile] = []
    for index in range(train_tiles):
        positive = index % 2 == 0
        name = f"train_{index:03d}.png"
        image, mask = _tile_and_mask(rng, positive)
        write_png(root / "data/normalized/images" / name, image)
        write_png(root / "data/pseudo_masks" / name, mask)
        tiles.append(Tile(name, "SSA" if positive else "HP", "train", positive))
    for index in range(4):
        name = f"test_{index:03d}.png"
        # Undecodable on purpose, and no pseudo-mask: the stage must never open test tiles.
        (root / "data/normalized/images" / name).write_bytes(b"not a png")
        tiles.append(Tile(name, "SSA" if index % 2 == 0 else "HP", "test", index % 2 == 0))
    write_annotations(root / "data/normalized/annotations.csv", tiles)
    params = {
        "seed": 3,
        "data": {"positive_label": "SSA"},
        "split": {"validation_fraction": 0.34, "seed": 1},
        "segmenter": segmenter or TINY_SEGMENTER,
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")


@pytest.fixture(scope="module")
def module_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for this module: creating a SQLite store costs seconds, so it is made once."""
    return f"sqlite:///{tmp_path_factory.mktemp('segmenter-mlflow')}/mlflow.db"


@pytest.fixture(autouse=True)
def _module_mlflow(module_mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", module_mlflow_store)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _write_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _read_history(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _stage_runs() -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return mlflow.search_runs(
        experiment_names=["weakseg"], filter_string="tags.`weakseg.stage` = 'train_segmenter'", output_format="list"
    )


def test_stage_writes_checkpoint_metrics_history_and_run_without_reading_test(project: Path) -> None:
    runs_before = {run.info.run_id for run in _stage_runs()}
    assert run_stage("train_segmenter", stage.run, argv=[]) == 0

    payload = torch.load(project / "models/segmenter.pt", map_location="cpu", weights_only=True)
    assert payload["kind"] == "segmenter" and payload["arch"] == "resnet18"
    assert payload["positive_label"] == "SSA" and payload["negative_label"] == "HP"
    assert payload["tile_size"] == TILE and payload["preprocessing"]["tile_size"] == TILE
    metrics = json.loads((project / "metrics/segmenter.json").read_text())
    assert payload["epoch"] == metrics["best_epoch"]
    assert payload["metrics"]["val_iou"] == pytest.approx(metrics["val_iou"])
    assert 0.0 <= metrics["val_iou"] <= 1.0 and 0.0 <= metrics["val_dice"] <= 1.0
    assert metrics["early_stopped_at_epoch"] is None
    assert metrics["train_tiles"] + metrics["validation_tiles"] == 12

    with (project / "metrics/segmenter_history.csv").open(newline="") as handle:
        assert next(csv.reader(handle)) == HISTORY_COLUMNS
    history = _read_history(project / "metrics/segmenter_history.csv")
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert [float(row["negative_probability"]) for row in history] == [0.0, 0.5]

    runs = [run for run in _stage_runs() if run.info.run_id not in runs_before]
    assert len(runs) == 1
    client = mlflow.tracking.MlflowClient()
    steps = [entry.step for entry in client.get_metric_history(runs[0].info.run_id, "val_iou")]
    assert steps == [1, 2]
    assert runs[0].data.params["segmenter.encoder"] == "resnet18"
    artifacts = [item.path for item in client.list_artifacts(runs[0].info.run_id)]
    assert "segmenter_history.csv" in artifacts


def test_stage_is_deterministic_to_the_checkpoint_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same params, same data: identical checkpoint bytes and identical history text on the CPU."""
    outputs = []
    for name in ("first", "second"):
        root = tmp_path / name
        _write_project(root)
        monkeypatch.chdir(root)
        assert run_stage("train_segmenter", stage.run, argv=[]) == 0
        outputs.append(
            ((root / "models/segmenter.pt").read_bytes(), (root / "metrics/segmenter_history.csv").read_text())
        )
    assert outputs[0][0] == outputs[1][0]
    assert outputs[0][1] == outputs[1][1]


def test_missing_pseudo_mask_is_a_user_error_naming_the_file(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "data/pseudo_masks/train_003.png").unlink()
    assert run_stage("train_segmenter", stage.run, argv=[]) == 2
    assert "train_003.png" in capsys.readouterr().err
    assert not (project / "models/segmenter.pt").exists()


class _SectionRecorder:
    """Stands in for a params section of which dvc.yaml declares only some keys; records the keys read."""

    def __init__(self, section: object, prefix: str, read: set[str]) -> None:
        self._section, self._prefix, self._read = section, prefix, read

    def __getattr__(self, name: str) -> object:
        self._read.add(f"{self._prefix}.{name}")
        return getattr(self._section, name)


def test_stage_reads_exactly_the_params_that_dvc_yaml_declares(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DVC re-runs the stage when a declared key changes, so a key read but not declared is a stale result
    waiting to happen, and a key declared but not read re-runs the stage for nothing."""
    declared = declared_params("train_segmenter", project / "dvc.yaml")
    read: set[str] = set()
    original = StageParams.__getattr__

    def recording(self: StageParams, name: str) -> object:
        value = original(self, name)  # an undeclared section raises here, and the stage exits 2
        read.add(name)
        if any(entry.startswith(f"{name}.") for entry in declared):  # e.g. data.positive_label, not data
            return _SectionRecorder(value, name, read)
        return value

    monkeypatch.setattr(StageParams, "__getattr__", recording)
    assert run_stage("train_segmenter", stage.run, argv=[]) == 0
    leaves = {key for key in read if not any(other.startswith(f"{key}.") for other in read)}
    assert leaves == set(declared)


def _tiny_data(count: int, seed: int) -> SegmenterData:
    rng = np.random.default_rng(seed)
    pairs = [_tile_and_mask(rng, index % 2 == 0) for index in range(count)]
    return SegmenterData(
        images=np.stack([image for image, _ in pairs]),
        masks=np.stack([mask for _, mask in pairs]),
        positives=np.array([index % 2 == 0 for index in range(count)]),
    )


def test_best_checkpoint_and_early_stopping(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted validation IoUs: the best epoch's weights are kept, and patience ends the run."""
    scripted_iou = iter([0.2, 0.6, 0.5, 0.6, 0.4, 0.9])
    weights_seen: list[torch.Tensor] = []

    def fake_validate(model: torch.nn.Module, *args: object, **kwargs: object) -> ValidationResult:
        weights_seen.append(next(iter(model.state_dict().values())).detach().clone())
        iou = next(scripted_iou)
        # 100 pixels with `iou` of them true positives and the rest false positives.
        counts = PixelCounts(true_positive=int(round(iou * 100)), false_positive=100 - int(round(iou * 100)))
        return ValidationResult(counts=counts, loss_sum=1.0, tiles=1)

    monkeypatch.setattr(loop, "validate", fake_validate)
    params = SegmenterParams(
        **{**TINY_SEGMENTER, "epochs": 6, "batch_size": 2, "early_stopping_patience": 2},
    )
    result = loop.train_segmenter(_tiny_data(4, 0), _tiny_data(2, 1), params, seed=0, device=torch.device("cpu"))
    assert result.best_epoch == 2  # 0.6 at epoch 4 ties and does not replace it
    assert result.best_metrics["val_iou"] == pytest.approx(0.6)
    assert result.stopped_early_at == 4
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    first_key = next(iter(result.best_state_dict))
    assert torch.equal(result.best_state_dict[first_key], weights_seen[1])
    assert not torch.equal(result.best_state_dict[first_key], weights_seen[3])


@pytest.mark.parametrize("rule", ["auto", "balanced_accuracy"])
def test_the_loop_chooses_the_head_threshold_by_segmenter_decision_rule(
    rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules: list[str] = []
    calibrate = loop.calibrate_head

    def recording(*args: Any) -> Any:
        rules.append(args[-1])
        return calibrate(*args)

    monkeypatch.setattr(loop, "calibrate_head", recording)
    params = SegmenterParams(**{**TINY_SEGMENTER, "epochs": 1, "batch_size": 2, "decision_rule": rule})
    result = loop.train_segmenter(_tiny_data(4, 0), _tiny_data(2, 1), params, seed=0, device=torch.device("cpu"))
    assert rules == [rule]
    assert result.head.rule == "balanced_accuracy"  # one validation tile of each class: auto keeps balanced accuracy


def test_selection_by_loss_keeps_the_lowest_validation_loss_whatever_the_iou(monkeypatch: pytest.MonkeyPatch) -> None:
    """``selection_metric: loss`` (targets without validation foreground): IoU is ignored, the lowest loss wins."""
    scripted = iter([(0.9, 3.0), (0.1, 1.0), (0.8, 2.0)])

    def fake_validate(*args: object, **kwargs: object) -> ValidationResult:
        iou, loss = next(scripted)
        counts = PixelCounts(true_positive=int(round(iou * 100)), false_positive=100 - int(round(iou * 100)))
        return ValidationResult(counts=counts, loss_sum=loss, tiles=1)

    monkeypatch.setattr(loop, "validate", fake_validate)
    params = SegmenterParams(**{**TINY_SEGMENTER, "epochs": 3, "batch_size": 2, "selection_metric": "loss"})
    result = loop.train_segmenter(_tiny_data(4, 0), _tiny_data(2, 1), params, seed=0, device=torch.device("cpu"))
    assert result.best_epoch == 2
    assert result.best_metrics["val_loss"] == pytest.approx(1.0)


def test_early_stopping_waits_for_the_positive_only_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_iou = iter([0.5, 0.1, 0.1, 0.1, 0.1])

    def fake_validate(*args: object, **kwargs: object) -> ValidationResult:
        iou = next(scripted_iou)
        counts = PixelCounts(true_positive=int(iou * 100), false_positive=100 - int(iou * 100))
        return ValidationResult(counts=counts, loss_sum=1.0, tiles=1)

    monkeypatch.setattr(loop, "validate", fake_validate)
    params = SegmenterParams(
        **{
            **TINY_SEGMENTER,
            "epochs": 5,
            "batch_size": 2,
            "early_stopping_patience": 1,
            "curriculum": CurriculumParams(positive_only_epochs=3, final_negative_probability=0.3),
        }
    )
    result = loop.train_segmenter(_tiny_data(4, 0), _tiny_data(2, 1), params, seed=0, device=torch.device("cpu"))
    assert result.stopped_early_at == 4
    assert result.best_epoch == 1


def test_flipped_tile_carries_its_mask() -> None:
    image = np.zeros((TILE, TILE, 3), dtype=np.uint8)
    image[:, :4] = 255  # a white band at the left edge
    mask = np.zeros((1, TILE, TILE), dtype=bool)
    mask[0, :, :4] = True
    augmentation = build_augmentation(AugmentParams(flips=True, rotate90=True, color_jitter=0.0, hue_jitter=0.0), 0)
    dataset = TileDataset(image[None], [True], mask, augmentation)
    moved = 0
    for seed in range(12):
        dataset.set_augmentation_seed(seed)
        tile, _, target = dataset[0]
        bright = tile.mean(dim=0) > 0  # normalized white is positive, black negative
        assert torch.equal(bright, target[0] > 0.5)
        moved += int(not torch.equal(target[0] > 0.5, torch.from_numpy(mask[0])))
    assert moved > 0  # some seeds did transform the pair


def test_stage_stores_the_validation_head_threshold(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shifted head scores (0.8 negative, 0.95 positive tiles): the checkpoint holds their midpoint, not 0.5."""

    def shifted(model: torch.nn.Module, images: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
        return np.array([0.95 if (image[..., 0] < 130).any() else 0.8 for image in images])

    monkeypatch.setattr(segmenter_validation, "head_probabilities", shifted)
    assert run_stage("train_segmenter", stage.run, argv=[]) == 0
    payload = torch.load(project / "models/segmenter.pt", map_location="cpu", weights_only=True)
    assert payload["head_threshold"] == pytest.approx(0.875)
    head = json.loads((project / "metrics/segmenter.json").read_text())["val_head"]
    assert head["threshold"] == pytest.approx(0.875) and head["rule"] == "balanced_accuracy"
    assert (head["balanced_accuracy"], head["sensitivity"], head["specificity"], head["auc"]) == (1.0, 1.0, 1.0, 1.0)
    loaded = load_model(project / "models/segmenter.pt", "segmenter", torch.device("cpu"))
    assert loaded.head_threshold == pytest.approx(0.875)


def test_onecycle_schedule_peaks_at_lr_and_anneals_over_every_batch() -> None:
    import torch

    from weakseg.params import SegmenterParams
    from weakseg.training.segmenter import build_scheduler

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=0.002)
    assert build_scheduler(optimizer, SegmenterParams(lr=0.002), 100) is None  # constant by default
    scheduler = build_scheduler(optimizer, SegmenterParams(lr=0.002, lr_schedule="onecycle"), 100)
    assert scheduler is not None
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(rates) == pytest.approx(0.002, rel=1e-3) and rates.index(max(rates)) in range(28, 32)
    assert rates[0] < 0.002 / 10 and rates[-1] < 0.002 / 1000


# ------------------------------------------------------------------------------ ignored band (255)
def _band_pseudo_mask(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Foreground in the top rows, an ignored band in the right columns below them."""
    foreground = np.zeros((size, size), dtype=bool)
    foreground[:4] = True
    ignore = np.zeros((size, size), dtype=bool)
    ignore[4:, size - 6 :] = True
    return foreground, ignore


def test_the_ignored_band_moves_with_its_pixels_under_augmentation(tmp_path: Path) -> None:
    """Pseudo-mask PNG (0/128/255) -> training targets 0/1/255 -> flips and rotations: every target pixel,
    the ignored label included, stays under the image pixel it was drawn for."""
    from weakseg.io import pseudo_mask_pixels
    from weakseg.models import IMAGENET_MEAN, IMAGENET_STD
    from weakseg.training.datasets import load_pseudo_masks

    size = 16
    foreground, ignore = _band_pseudo_mask(size)
    write_png(tmp_path / "a.png", pseudo_mask_pixels(foreground, ignore))
    targets = load_pseudo_masks(tmp_path, [Tile("a.png", "SSA", "train", True)])
    assert targets.dtype == np.uint8 and set(np.unique(targets).tolist()) == {0, 1, 255}
    assert (targets[0][ignore] == 255).all() and (targets[0][foreground] == 1).all()
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[..., 0] = np.arange(size * size).reshape(size, size)  # each pixel's red value is its index
    augmentation = build_augmentation(AugmentParams(flips=True, rotate90=True, color_jitter=0.0, hue_jitter=0.0), 0)
    dataset = TileDataset(image[None], [True], targets, augmentation)
    mean, std = np.float32(IMAGENET_MEAN[0]) * 255.0, np.float32(IMAGENET_STD[0]) * 255.0  # tile_to_tensor's
    moved = 0
    for seed in range(12):
        dataset.set_augmentation_seed(seed)
        tile, _, target = dataset[0]
        origin = np.rint(tile[0].numpy() * std + mean).astype(np.int64)  # where each output pixel came from
        assert sorted(origin.ravel().tolist()) == list(range(size * size))
        np.testing.assert_array_equal(target[0].numpy(), targets[0].ravel()[origin].astype(np.float32))
        moved += int(not np.array_equal(origin, np.arange(size * size).reshape(size, size)))
    assert moved > 0


def test_truth_targets_without_true_masks_fail_before_training_naming_the_parameter(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["segmenter"] = {**params["segmenter"], "targets": "truth"}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    trained: list[bool] = []
    monkeypatch.setattr(stage, "run_training_stage", lambda *args, **kwargs: trained.append(True))
    assert run_stage("train_segmenter", stage.run, argv=[]) == 2
    assert "segmenter.targets" in capsys.readouterr().err and not trained


def test_truth_targets_train_on_the_true_masks(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With segmenter.targets: truth the split loads data/raw/masks, not the pseudo-masks."""
    shutil.copytree(project / "data/pseudo_masks", project / "data/raw/masks")
    for path in (project / "data/pseudo_masks").iterdir():
        write_png(path, np.zeros((8, 8), dtype=bool))  # wrong size on purpose: never read under truth
    assert stage.target_masks_folder("truth") == stage.TRUE_MASKS
    annotations = read_annotations(project / "data/normalized/annotations.csv", "SSA")
    tiles = [tile for tile in annotations if tile.partition == "train"]
    truth = stage.target_masks_folder("truth")
    data = load_segmenter_split(stage.NORMALIZED / "images", truth, tiles[:2], "train", pseudo_masks=False)
    assert data.masks.shape[1:] == data.images.shape[1:3]
