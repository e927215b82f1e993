"""The train_classifier stage and its loop: freezing, selection, divergence, balance, outputs, MLflow, determinism."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
import yaml

from stages import train_classifier as stage
from weakseg import models
from weakseg.data.layout import Tile, partition, read_annotations, split_train_validation, write_annotations
from weakseg.io import write_png
from weakseg.losses.classification import positive_weight
from weakseg.metrics import choose_balanced_accuracy_threshold, classification_scores
from weakseg.params import AugmentParams, ClassifierParams, Params, UnfreezeParams
from weakseg.preprocessing import images_to_tensor
from weakseg.stage import run_stage
from weakseg.training import classifier as loop
from weakseg.training import datasets
from weakseg.training.augment import build_augmentation
from weakseg.training.classifier_data import build_train_loader
from weakseg.training.datasets import TileDataset

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TILE = 32
EPOCHS = 2
TINY_CLASSIFIER = {
    "arch": "resnet18",
    "weights": "none",
    "epochs": EPOCHS,
    "batch_size": 4,
    "lr": 0.01,
    "num_workers": 0,
    "device": "cpu",
    "unfreeze": {"enabled": False, "frozen_epochs": 5, "full_epoch": 25},
}


# -------------------------------------------------------------------------------------------- helpers
def _tile_image(rng: np.random.Generator, positive: bool) -> np.ndarray:
    """Pink noise; positive tiles carry a dark purple blob somewhere."""
    image = rng.integers(150, 230, size=(TILE, TILE, 3), dtype=np.uint8)
    image[..., 1] = (image[..., 1] * 0.7).astype(np.uint8)
    if positive:
        top, left = rng.integers(0, TILE // 2, size=2)
        image[top : top + TILE // 2, left : left + TILE // 2] = (70, 40, 120)
    return image


def make_dataset(root: Path, train: int = 16, test: int = 4, seed: int = 0) -> list[Tile]:
    """A tiny dataset in MHIST's layout under ``root``; test-partition images are corrupt files."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    tiles: list[Tile] = []
    for index in range(train + test):
        positive = index % 3 == 0
        name = f"tile_{index:03d}.png"
        is_test = index >= train
        tiles.append(Tile(name, "SSA" if positive else "HP", "test" if is_test else "train", positive))
        if is_test:
            # Not a PNG: decoding a test tile would fail the stage.
            (images / name).write_bytes(b"test tiles must never be decoded by train_classifier")
        else:
            write_png(images / name, _tile_image(rng, positive))
    write_annotations(root / "annotations.csv", tiles)
    return tiles


def write_params(folder: Path, classifier: dict[str, Any] | None = None) -> None:
    """Schema defaults plus the tiny classifier settings, and the project's dvc.yaml, into ``folder``."""
    document = Params().model_dump()
    document["classifier"].update(TINY_CLASSIFIER)
    document["classifier"].update(classifier or {})
    (folder / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    shutil.copy(PROJECT_ROOT / "dvc.yaml", folder / "dvc.yaml")


def run_in(folder: Path, monkeypatch: pytest.MonkeyPatch, classifier: dict[str, Any] | None = None) -> int:
    """Builds a tiny project in ``folder`` and runs the stage there."""
    make_dataset(folder / "data" / "normalized")
    write_params(folder, classifier)
    monkeypatch.chdir(folder)
    return run_stage("train_classifier", stage.run, argv=[])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One stage run shared by the output tests, with every decoded image path recorded."""
    folder = tmp_path_factory.mktemp("classifier_run")
    uri = f"sqlite:///{tmp_path_factory.mktemp('classifier_mlflow')}/mlflow.db"
    decoded: list[str] = []
    original_read_rgb = datasets.read_rgb

    def spy(path: Any) -> np.ndarray:
        decoded.append(Path(path).name)
        return original_read_rgb(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setattr(datasets, "read_rgb", spy)
        torch.set_num_threads(1)
        status = run_in(folder, patch)
    yield {"folder": folder, "status": status, "uri": uri, "decoded": decoded}


def _in_memory_datasets(count: int = 12) -> tuple[TileDataset, TileDataset]:
    rng = np.random.default_rng(3)
    labels = [index % 3 == 0 for index in range(count)]
    images = np.stack([_tile_image(rng, positive) for positive in labels])
    augmentation = build_augmentation(AugmentParams(), seed=1)
    return TileDataset(images, labels, augmentation=augmentation), TileDataset(images[:6], labels[:6])


def test_frozen_layers_and_their_batch_norm_statistics_do_not_change() -> None:
    torch.manual_seed(0)
    model = models.build_classifier("resnet18", "none")
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    train_set, validation_set = _in_memory_datasets()
    params = ClassifierParams(
        epochs=3, batch_size=4, unfreeze=UnfreezeParams(frozen_epochs=1, full_epoch=2, enabled=True)
    )
    snapshots: list[dict[str, torch.Tensor]] = []

    def snapshot(row: dict[str, Any]) -> None:
        snapshots.append({key: value.clone() for key, value in model.state_dict().items()})

    loop.train_classifier(
        model, train_set, validation_set, params, seed=0, device=torch.device("cpu"), on_epoch_end=snapshot
    )

    def changed(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor], prefix: str) -> bool:
        keys = [key for key in before if key.startswith(prefix) and before[key].is_floating_point()]
        assert keys
        return any(not torch.equal(after[key], before[key]) for key in keys)

    after_frozen, after_layer4, after_full = snapshots
    assert changed(after_frozen, initial, "fc.")
    for prefix in ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4."):
        assert not changed(after_frozen, initial, prefix), prefix  # weights and running statistics
    assert changed(after_layer4, after_frozen, "layer4.")
    for prefix in ("conv1.", "bn1.", "layer1.", "layer2.", "layer3."):
        assert not changed(after_layer4, initial, prefix), prefix
    for prefix in ("conv1.", "bn1.", "layer1."):  # from full_epoch on, the stem trains too
        assert changed(after_full, after_layer4, prefix), prefix


# -------------------------------------------------------------------------------- selection and loop
@pytest.mark.parametrize(
    ("metric", "candidate", "best", "expected"),
    [
        ("loss", 0.4, 0.5, True),
        ("loss", 0.6, 0.5, False),
        ("auc", 0.6, 0.5, True),
        ("accuracy", 0.5, 0.5, False),
        ("balanced_accuracy", 0.1, None, True),
        ("auc", float("nan"), 0.5, False),
        # A NaN first epoch is the best only until a number comes: it must not block every later epoch.
        ("auc", 0.6, float("nan"), True),
        ("loss", 0.6, float("nan"), True),
        ("auc", float("nan"), float("nan"), False),
        ("auc", float("nan"), None, True),
    ],
)
def test_selection_direction(metric: str, candidate: float, best: float | None, expected: bool) -> None:
    assert loop.is_better(metric, candidate, best) is expected


def test_a_nan_first_epoch_does_not_block_the_best_later_one(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_auc = iter([float("nan"), 0.6, 0.4])

    def fake_scores(*args: object) -> dict[str, float]:
        return {"loss": 1.0, "accuracy": 0.5, "balanced_accuracy": 0.5, "auc": next(scripted_auc)}

    monkeypatch.setattr(loop, "validation_scores", fake_scores)
    train_set, validation_set = _in_memory_datasets()
    params = ClassifierParams(epochs=3, batch_size=4, selection_metric="auc")
    torch.manual_seed(0)
    result = loop.train_classifier(
        models.build_classifier("resnet18", "none"), train_set, validation_set, params, 0, torch.device("cpu")
    )
    assert (result.best_epoch, result.best_scores["auc"]) == (1, 0.6)


def test_divergence_is_a_user_error_naming_the_learning_rate() -> None:
    train_set, _ = _in_memory_datasets()
    model = models.build_classifier("resnet18", "none")
    params = ClassifierParams(epochs=1, batch_size=4)

    class NanLoss(torch.nn.Module):
        def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return logits.sum() * float("nan")

    optimizer = loop.build_optimizer(model, params)
    with pytest.raises(loop.TrainingDivergedError, match="classifier.lr"):
        loop.train_one_epoch(
            model, build_train_loader(train_set, 4, 0, 0), NanLoss(), optimizer, None, torch.device("cpu")
        )


def test_one_cycle_schedule_peaks_at_the_learning_rate_and_steps_per_batch() -> None:
    model = torch.nn.Linear(2, 1)
    params = ClassifierParams(epochs=3, lr=0.05)
    optimizer = loop.build_optimizer(model, params)
    scheduler = loop.build_scheduler(optimizer, params, steps_per_epoch=10)
    rates = []
    for _ in range(30):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(rates) == pytest.approx(0.05, rel=1e-3)
    assert rates[0] < 0.01 and rates[-1] < 0.001
    assert optimizer.param_groups[0]["momentum"] == params.momentum


# ------------------------------------------------------------------------------------------ weights
def test_local_weights_file_is_loaded(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(5)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "backbone.pt"
    torch.save(source.state_dict(), path)
    model = models.build_classifier("resnet18", str(path))
    loaded_conv = model.get_submodule("layer3.0.conv1")
    assert isinstance(loaded_conv, torch.nn.Conv2d)
    assert torch.equal(loaded_conv.weight, source.layer3[0].conv1.weight)
    head = model.fc
    assert isinstance(head, torch.nn.Linear)
    assert head.out_features == 1


def test_offline_imagenet_download_stops_the_stage_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from torchvision.models._api import WeightsEnum

    def offline(*args: Any, **kwargs: Any) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    assert run_in(tmp_path, monkeypatch, {"weights": "imagenet"}) == 2
    message = capsys.readouterr().err
    assert "ImageNet weights" in message and "'none'" in message and "local weights file" in message
    assert not (tmp_path / "models" / "classifier.pt").exists()


def test_missing_weights_file_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_in(tmp_path, monkeypatch, {"weights": "nowhere/backbone.pt"}) == 2
    assert "nowhere/backbone.pt" in capsys.readouterr().err


def test_missing_annotations_name_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert run_stage("train_classifier", stage.run, argv=[]) == 2
    assert "data/normalized/annotations.csv" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_names_the_parameter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_in(tmp_path, monkeypatch, {"device": "cuda"}) == 2
    assert "classifier.device" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- stage outputs
def test_stage_succeeds_without_decoding_any_test_tile(trained: dict[str, Any]) -> None:
    assert trained["status"] == 0
    tiles = read_annotations(trained["folder"] / "data" / "normalized" / "annotations.csv", "SSA")
    train_names = {tile.name for tile in partition(tiles, "train")}
    assert set(trained["decoded"]) == train_names  # every train tile once, no test tile
    assert len(trained["decoded"]) == len(train_names)


def _validation_probabilities(folder: Path) -> tuple[dict[str, Any], list[Any], np.ndarray]:
    """The saved classifier's checkpoint, the validation tiles, and its float64 probabilities on them."""
    payload = models.load_checkpoint(folder / "models" / "classifier.pt", kind="classifier")
    model = models.model_from_checkpoint(payload)
    tiles = read_annotations(folder / "data" / "normalized" / "annotations.csv", "SSA")
    params = Params()
    _, validation = split_train_validation(
        partition(tiles, "train"), params.split.validation_fraction, params.split.seed
    )
    images = datasets.load_tiles(folder / "data" / "normalized" / "images", validation)
    with torch.no_grad():
        probabilities = torch.sigmoid(model(images_to_tensor(images)).reshape(-1)).numpy().astype(np.float64)
    return payload, validation, probabilities


def test_checkpoint_round_trip_reproduces_the_reported_validation_metrics(trained: dict[str, Any]) -> None:
    folder = trained["folder"]
    raw = torch.load(folder / "models" / "classifier.pt", map_location="cpu", weights_only=True)
    assert raw["kind"] == "classifier" and raw["arch"] == "resnet18"
    assert raw["positive_label"] == "SSA" and raw["negative_label"] == "HP"
    assert raw["tile_size"] == TILE and raw["preprocessing"]["tile_size"] == TILE
    payload, validation, probabilities = _validation_probabilities(folder)
    scores = classification_scores([tile.positive for tile in validation], probabilities)
    reported = json.loads((folder / "metrics" / "classifier.json").read_text())
    assert scores["accuracy"] == pytest.approx(reported["validation"]["accuracy"], abs=1e-9)
    assert scores["auc"] == pytest.approx(reported["validation"]["auc"], abs=1e-9)
    assert payload["epoch"] == reported["best_epoch"]


def test_metrics_and_history_files(trained: dict[str, Any]) -> None:
    folder = trained["folder"]
    metrics = json.loads((folder / "metrics" / "classifier.json").read_text())
    validation = metrics["validation"]
    assert set(validation) >= {"accuracy", "balanced_accuracy", "auc", "loss", "majority_class_rate"}
    assert 0 <= metrics["best_epoch"] < EPOCHS
    # 16 train tiles, a third positive; 20% validation, stratified: 1 positive of 3
    assert validation["tiles"] == 3 and validation["positive_tiles"] == 1
    assert validation["majority_class_rate"] == pytest.approx(2 / 3)
    with (folder / "metrics" / "classifier_history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(loop.HISTORY_COLUMNS)
    assert [int(row["epoch"]) for row in rows] == list(range(EPOCHS))
    best = rows[metrics["best_epoch"]]
    assert float(best["val_balanced_accuracy"]) == pytest.approx(validation["balanced_accuracy"], abs=1e-5)
    assert max(float(row["val_balanced_accuracy"]) for row in rows) == pytest.approx(
        validation["balanced_accuracy"], abs=1e-5
    )


def test_mlflow_run_records_params_per_epoch_metrics_and_the_history(trained: dict[str, Any]) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=trained["uri"])
    mlflow.set_tracking_uri(trained["uri"])
    runs = mlflow.search_runs(experiment_names=["weakseg"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["weakseg.stage"] == "train_classifier"
    assert run.data.params["classifier.arch"] == "resnet18" and run.data.params["seed"] == "42"
    with (trained["folder"] / "metrics" / "classifier_history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for name in ("train_loss", "val_loss", "val_accuracy", "val_auc", "lr"):
        recorded = sorted(client.get_metric_history(run.info.run_id, name), key=lambda metric: metric.step)
        assert [metric.step for metric in recorded] == list(range(EPOCHS)), name
        assert [metric.value for metric in recorded] == pytest.approx([float(row[name]) for row in rows], rel=1e-5)
    reported = json.loads((trained["folder"] / "metrics" / "classifier.json").read_text())
    assert run.data.metrics["best.validation.accuracy"] == pytest.approx(reported["validation"]["accuracy"])
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert "classifier_history.csv" in artifacts


def test_two_runs_give_identical_checkpoint_bytes(
    trained: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Determinism on CPU holds to the byte: same params, same checkpoint file."""
    assert run_in(tmp_path, monkeypatch) == 0
    first, second = trained["folder"], tmp_path
    for output in ("models/classifier.pt", "metrics/classifier.json", "metrics/classifier_history.csv"):
        assert (first / output).read_bytes() == (second / output).read_bytes(), output


# ----------------------------------------------------------------------------------------- class balance
def test_weight_mode_bce_is_torchs_bce_with_the_split_ratio_as_pos_weight() -> None:
    labels = [True, True, False, False, False, False, False, False]  # 6 negatives / 2 positives
    assert positive_weight(labels) == pytest.approx(3.0)
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.5, 0.0, -0.5, 4.0])
    targets = torch.tensor(labels, dtype=torch.float32)
    params = ClassifierParams(balance="weight", bce_weight=1.0, focal_tversky_weight=0.0)
    weighted = loop.build_loss(params, positive_weight(labels))(logits, targets)
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0))(logits, targets)
    assert float(weighted) == pytest.approx(float(expected), rel=1e-6)
    assert float(weighted) != pytest.approx(float(torch.nn.BCEWithLogitsLoss()(logits, targets)))


def test_weight_mode_trains_with_the_training_splits_ratio() -> None:
    train_set, validation_set = _in_memory_datasets()  # 4 positive, 8 negative train tiles
    params = ClassifierParams(epochs=1, batch_size=4, balance="weight")
    torch.manual_seed(0)
    result = loop.train_classifier(
        models.build_classifier("resnet18", "none"), train_set, validation_set, params, 0, torch.device("cpu")
    )
    assert (result.balance, result.pos_weight) == ("weight", pytest.approx(2.0))


@pytest.mark.parametrize("rule", ["auto", "balanced_accuracy"])
def test_the_loop_chooses_the_threshold_by_classifier_decision_rule(
    rule: Literal["auto", "balanced_accuracy"], monkeypatch: pytest.MonkeyPatch
) -> None:
    rules: list[str] = []
    calibrate: Callable[..., Any] = loop.calibrate_decision

    def recording(*args: Any, rule: str, **kwargs: Any) -> Any:
        rules.append(rule)
        return calibrate(*args, rule=rule, **kwargs)

    monkeypatch.setattr(loop, "calibrate_decision", recording)
    train_set, validation_set = _in_memory_datasets()
    torch.manual_seed(0)
    result = loop.train_classifier(
        models.build_classifier("resnet18", "none"),
        train_set,
        validation_set,
        ClassifierParams(epochs=1, batch_size=4, decision_rule=rule),
        0,
        torch.device("cpu"),
    )
    assert rules == [rule]
    # Two validation positives and four negatives: both classes under 10 tiles, so auto is balanced accuracy.
    assert result.decision.rule == "balanced_accuracy"


def test_stage_stores_and_reports_the_validation_decision_threshold(trained: dict[str, Any]) -> None:
    folder = trained["folder"]
    payload, validation, probabilities = _validation_probabilities(folder)
    labels = [tile.positive for tile in validation]
    expected = choose_balanced_accuracy_threshold(labels, probabilities).threshold
    reported = json.loads((folder / "metrics" / "classifier.json").read_text())
    assert payload["decision_threshold"] == pytest.approx(expected, abs=1e-6)
    assert reported["decision"]["threshold"] == payload["decision_threshold"]
    assert reported["decision"]["rule"] == "balanced_accuracy"  # the schema's default rule
    at_threshold = classification_scores(labels, probabilities, payload["decision_threshold"])
    assert reported["decision"]["balanced_accuracy"] == pytest.approx(at_threshold["balanced_accuracy"])
    assert reported["balance"] == "none"
    import mlflow

    mlflow.set_tracking_uri(trained["uri"])
    run = mlflow.search_runs(experiment_names=["weakseg"], output_format="list")[0]
    assert run.data.metrics["best.decision.threshold"] == pytest.approx(payload["decision_threshold"])
    assert run.data.tags["decision.rule"] == "balanced_accuracy"


# ------------------------------------------------------------------------------------- crop training
def test_crop_training_steps_over_every_crop_and_keeps_whole_tile_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training batches are crops (3 per tile and epoch, so 3x the steps); the checkpoint and its reported
    validation metrics are of whole tiles."""
    shapes: list[tuple[int, ...]] = []
    original = loop.train_epoch

    def spy(batches: Any, *args: Any, **kwargs: Any) -> Any:
        def recorded() -> Iterator[Any]:
            for batch in batches:
                shapes.append(tuple(batch[0].shape))
                yield batch

        return original(recorded(), *args, **kwargs)

    monkeypatch.setattr(loop, "train_epoch", spy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    torch.set_num_threads(1)
    project = tmp_path / "project"
    project.mkdir()
    assert run_in(project, monkeypatch, {"crop_size": 16, "crops_per_tile": 3, "epochs": 1}) == 0
    train_tiles = 16 - 4  # make_dataset's train partition less the validation split (Params() default)
    assert all(shape[1:] == (3, 16, 16) for shape in shapes)
    assert sum(shape[0] for shape in shapes) == train_tiles * 3 // 4 * 4  # whole batches of 4 crops
    _, validation, probabilities = _validation_probabilities(project)
    reported = json.loads((project / "metrics" / "classifier.json").read_text())
    scores = classification_scores([tile.positive for tile in validation], probabilities)
    assert scores["auc"] == pytest.approx(reported["validation"]["auc"], abs=1e-9)
    assert torch.load(project / "models" / "classifier.pt", weights_only=True)["tile_size"] == TILE


def test_a_crop_larger_than_the_tiles_stops_the_stage_naming_the_parameter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_in(tmp_path, monkeypatch, {"crop_size": TILE * 2}) == 2
    assert f"classifier.crop_size is {TILE * 2} px" in capsys.readouterr().err
    assert not (tmp_path / "models" / "classifier.pt").exists()
