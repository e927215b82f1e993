"""Distributed training: sharding helpers, samplers, collectives on gloo, both training stages run in two
processes (``torch.distributed.run`` on CPU) against a one-process run with the same global batch, and
the sharded generate_cams / evaluate against one process.

Stated tolerances of the two-process vs one-process comparison (measured differences in brackets):

- classifier: train loss 1e-2 relative [8.5e-4], validation loss 1e-3 relative [2e-5], accuracy,
  balanced accuracy and AUC equal, same best epoch;
- segmenter: train loss 3e-2 relative [1.4e-2], validation loss 2e-3 relative [2.2e-4], validation IoU
  1e-2 absolute [2.6e-3], Dice 2e-2 absolute [5e-3].

Why they are not zero: batch-norm statistics and the losses are those of the global batch in both runs
(GlooSyncBatchNorm, gather_batch) and the data order is the same, so for the classifier only the float
summation order differs (per-process batches of 2 instead of 4); the segmenter's dropout masks are also
drawn per process. Augmentation is switched off, since each process has its own augmentation stream.
Float differences grow about 10x per step at a learning rate of 0.02 on 32-pixel tiles (ResNet's last
batch norm sees 1x1 maps), so the comparison trains at lr 1e-4, where they stay near rounding size.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
import torch.distributed as torch_distributed
import torch.multiprocessing as torch_multiprocessing
from torch.utils.data import DataLoader, Dataset

from weakseg import distributed
from weakseg.distributed import DistributedContext, launch
from weakseg.params import CurriculumParams
from weakseg.training.curriculum import epoch_indices

# The stages, the segmenter loop and the other test modules are imported inside the tests that use them:
# the collectives test's worker processes import this module, and those imports (segmentation models)
# would cost each of them seconds.

NO_AUGMENTATION = {"flips": False, "rotate90": False, "color_jitter": 0.0, "hue_jitter": 0.0}
COMPARISON_LR = 1e-4


def _contexts(world_size: int) -> list[DistributedContext]:
    return [DistributedContext(rank=rank, world_size=world_size) for rank in range(world_size)]


# ------------------------------------------------------------------------------------- pure helpers
def test_shard_pad_and_unshard_round_trip() -> None:
    items = list(range(11))
    shares = [distributed.shard(items, context) for context in _contexts(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert distributed.unshard(shares, len(items)) == items
    assert distributed.pad_to_multiple(items, 4) == items + [0]
    assert distributed.pad_to_multiple([], 4) == []
    with pytest.raises(ValueError, match="expected 12"):
        distributed.unshard(shares, 12)


def test_batch_size_must_split_evenly_and_the_message_names_the_parameter() -> None:
    assert distributed.per_process_batch_size(8, 4, "classifier.batch_size") == 2
    with pytest.raises(distributed.DistributedBatchError, match=r"segmenter\.batch_size=6.*4 processes"):
        distributed.per_process_batch_size(6, 4, "segmenter.batch_size")


def test_single_process_order_is_the_order_of_a_seeded_shuffling_loader() -> None:
    generator = torch.Generator()
    generator.manual_seed(45)
    loader = DataLoader(cast("Dataset[int]", list(range(23))), batch_size=1, shuffle=True, generator=generator)
    assert [int(item) for item in loader] == distributed.single_process_order(23, 45)
    assert distributed.single_process_order(23, 45) != distributed.single_process_order(23, 46)


@pytest.mark.parametrize(("dataset_size", "drop_last"), [(13, True), (3, False)])
def test_sampler_shares_are_disjoint_equal_and_rebuild_the_one_process_batches(
    dataset_size: int, drop_last: bool
) -> None:
    batch, world_size, seed, epoch = 4, 2, 42, 3
    samplers = []
    for context in _contexts(world_size):
        sampler = distributed.SameOrderDistributedSampler(dataset_size, batch, drop_last, context, seed)
        sampler.set_epoch(epoch)
        samplers.append(sampler)
    shares = [list(sampler) for sampler in samplers]
    assert [len(share) for share in shares] == [len(sampler) for sampler in samplers]
    assert len({len(share) for share in shares}) == 1  # equal step counts, or DDP would hang
    order = distributed.single_process_order(dataset_size, seed + epoch)
    if drop_last:
        assert not set(shares[0]) & set(shares[1])
        per_process = batch // world_size
        for step in range(dataset_size // batch):
            together = sorted(share[step * per_process + k] for share in shares for k in range(per_process))
            assert together == sorted(order[step * batch : (step + 1) * batch])
    else:
        assert sorted(shares[0] + shares[1]) == sorted(distributed.pad_to_multiple(order, world_size))
        assert set(shares[0]) | set(shares[1]) == set(range(dataset_size))


def test_curriculum_batches_split_each_one_process_batch_over_the_ranks() -> None:
    from weakseg.training.segmenter_data import distributed_training_batches, training_batches

    positives = np.array([True, False] * 20)
    curriculum = CurriculumParams(positive_only_epochs=1, final_negative_probability=0.5)
    indices = epoch_indices(positives, 3, 4, curriculum, seed=5)
    one_process = training_batches(indices, 4)
    per_rank = [distributed_training_batches(indices, 4, rank, 2) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(one_process)
    for step, batch in enumerate(one_process):
        assert sorted(per_rank[0][step] + per_rank[1][step]) == sorted(batch)
        assert not set(per_rank[0][step]) & set(per_rank[1][step])
    # Three ranks and a last batch of two: folded into the batch before, so no rank idles in a step.
    shares = [distributed_training_batches(np.arange(10), 4, rank, 3) for rank in range(3)]
    assert [len(batches) for batches in shares] == [2, 2, 2]
    assert sorted(sum((batches[-1] for batches in shares), [])) == [4, 5, 6, 7, 8, 9]


def test_without_torchrun_the_context_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched_by_torchrun()
    context = distributed.init_distributed("auto", "cpu")
    assert (context.rank, context.world_size, context.enabled, context.is_main) == (0, 1, False, True)
    assert distributed.resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert distributed.resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    command = distributed.relaunch_command("stages.train_segmenter", 4, ["--params", "p.yaml"])
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        "-m",
        "stages.train_segmenter",
        "--params",
        "p.yaml",
    ]


# ------------------------------------------------------------------------------- collectives (gloo)
def _collectives_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """Each of two processes checks the collectives against one-process computations of the whole batch."""
    torch.set_num_threads(1)
    torch_distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    context = DistributedContext(rank=rank, world_size=world_size)
    try:
        generator = torch.Generator().manual_seed(0)
        whole = torch.randn(5, 3, 4, 4, generator=generator) * 3 + 1
        upstream = torch.randn(5, 3, 4, 4, generator=generator)
        reference = torch.nn.BatchNorm2d(3)
        inputs = whole.clone().requires_grad_(True)
        (reference(inputs) * upstream).sum().backward()

        converted = distributed.convert_to_gloo_sync_batch_norm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
        assert isinstance(converted, torch.nn.Sequential)
        synced = converted[0]
        assert isinstance(synced, distributed.GlooSyncBatchNorm)
        share = whole[rank::world_size].clone().requires_grad_(True)
        # Every rank computes the loss of the global batch (what gather_batch enables), as DDP then averages.
        output = distributed.gather_batch(synced(share), context)
        (output * upstream).sum().backward()
        assert share.grad is not None and synced.weight.grad is not None
        gradient_share = share.grad / world_size  # DDP's average over the ranks
        average_weight_grad = distributed.all_reduce_sum(synced.weight.grad, context) / world_size

        gathered = distributed.gather_objects({"rank": rank}, context)
        summed = distributed.all_reduce_sum(torch.tensor([rank + 1, 10 * (rank + 1)]), context)
        buffer_model = torch.nn.BatchNorm1d(2)
        assert buffer_model.running_mean is not None and buffer_model.num_batches_tracked is not None
        buffer_model.running_mean.fill_(float(rank))  # ranks disagree; averaging makes them agree
        distributed.average_buffers(buffer_model, context)
        assert inputs.grad is not None and reference.weight.grad is not None
        assert synced.running_mean is not None and reference.running_mean is not None
        assert synced.running_var is not None and reference.running_var is not None
        result = {
            "forward": float(
                (output.detach() - torch.nn.functional.batch_norm(whole, None, None, training=True, eps=reference.eps))
                .abs()
                .max()
            ),
            "input_grad": float((gradient_share - inputs.grad[rank::world_size]).abs().max()),
            "weight_grad": float((average_weight_grad - reference.weight.grad).abs().max()),
            "running_mean": float((synced.running_mean - reference.running_mean).abs().max()),
            "running_var": float((synced.running_var - reference.running_var).abs().max()),
            "gathered": gathered,
            "summed": summed.tolist(),
            "averaged_mean": buffer_model.running_mean.tolist(),
            "batches_tracked": int(buffer_model.num_batches_tracked),
        }
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch_distributed.destroy_process_group()


def test_collectives_reproduce_one_process_batch_norm_gradients_and_sums(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch_multiprocessing.spawn(_collectives_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # Shares of 3 and 2 tiles: batch norm and gradients are those of the whole batch of 5.
        assert result["forward"] < 1e-5
        assert result["input_grad"] < 1e-5
        assert result["weight_grad"] < 1e-4
        assert result["running_mean"] < 1e-6 and result["running_var"] < 1e-6
        assert result["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert result["summed"] == [3, 30]
        assert result["averaged_mean"] == [0.5, 0.5] and result["batches_tracked"] == 0


# ------------------------------------------------------------------------------------------ stages
@pytest.fixture(scope="module")
def stage_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the stage runs of this module (creating a store costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('distributed-mlflow')}/mlflow.db"


def _runs_of(stage: str, uri: str) -> list[Any]:
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(
        experiment_names=["weakseg"], filter_string=f"tags.`weakseg.stage` = '{stage}'", output_format="list"
    )


def _history(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def _run_twice(
    stage: str, body: Any, build: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str
) -> dict[int, Path]:
    """Runs ``stage`` in one and in two processes in fresh project folders; returns the folders."""
    from weakseg.stage import run_stage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2 cores: one thread per process
    folders: dict[int, Path] = {}
    for processes in (1, 2):
        folder = tmp_path / f"{processes}-process"
        folder.mkdir()
        build(folder, processes)
        monkeypatch.chdir(folder)
        before = {run.info.run_id for run in _runs_of(stage, uri)}
        assert run_stage(stage, body, argv=[]) == 0
        new_runs = [run for run in _runs_of(stage, uri) if run.info.run_id not in before]
        assert len(new_runs) == 1, f"{processes} process(es) made {len(new_runs)} MLflow runs"
        assert new_runs[0].info.status == "FINISHED"
        folders[processes] = folder
    return folders


def test_classifier_in_two_processes_matches_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage_store: str
) -> None:
    from tests import test_train_classifier as classifier_tests

    def build(folder: Path, processes: int) -> None:
        classifier_tests.make_dataset(folder / "data" / "normalized")
        classifier_tests.write_params(
            folder,
            {
                "lr": COMPARISON_LR,
                "augment": NO_AUGMENTATION,
                "distributed": {"processes_per_node": processes, "backend": "auto"},
            },
        )

    from stages import train_classifier

    folders = _run_twice("train_classifier", train_classifier.run, build, tmp_path, monkeypatch, stage_store)
    for folder in folders.values():
        assert sorted(path.name for path in (folder / "models").iterdir()) == ["classifier.pt"]
    one, two = (_history(folders[n] / "metrics" / "classifier_history.csv") for n in (1, 2))
    assert [row["epoch"] for row in two] == [row["epoch"] for row in one] == [0.0, 1.0]
    for single, double in zip(one, two, strict=True):
        assert double["train_loss"] == pytest.approx(single["train_loss"], rel=1e-2)
        assert double["val_loss"] == pytest.approx(single["val_loss"], rel=1e-3)
        for name in ("val_accuracy", "val_balanced_accuracy", "val_auc", "lr"):
            assert double[name] == pytest.approx(single[name], rel=1e-6), name
    metrics = [json.loads((folders[n] / "metrics" / "classifier.json").read_text()) for n in (1, 2)]
    assert metrics[1]["best_epoch"] == metrics[0]["best_epoch"]
    assert metrics[1]["validation"]["tiles"] == metrics[0]["validation"]["tiles"] == 3
    # The decision threshold is chosen on validation logits gathered from both ranks: the same choice.
    assert metrics[1]["decision"]["threshold"] == pytest.approx(metrics[0]["decision"]["threshold"], rel=1e-2)
    checkpoint = torch.load(folders[2] / "models" / "classifier.pt", map_location="cpu", weights_only=True)
    assert not any(key.startswith("module.") for key in checkpoint["state_dict"])  # not the DDP wrapper's


def test_segmenter_in_two_processes_matches_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage_store: str
) -> None:
    from tests import test_train_segmenter as segmenter_tests

    def build(folder: Path, processes: int) -> None:
        segmenter_tests._write_project(
            folder,
            {
                **segmenter_tests.TINY_SEGMENTER,
                "lr": COMPARISON_LR,
                "augment": NO_AUGMENTATION,
                "distributed": {"processes_per_node": processes, "backend": "auto"},
            },
        )

    from stages import train_segmenter

    folders = _run_twice("train_segmenter", train_segmenter.run, build, tmp_path, monkeypatch, stage_store)
    for folder in folders.values():
        assert sorted(path.name for path in (folder / "models").iterdir()) == ["segmenter.pt"]
    one, two = (_history(folders[n] / "metrics" / "segmenter_history.csv") for n in (1, 2))
    assert [row["epoch"] for row in two] == [row["epoch"] for row in one] == [1.0, 2.0]
    for single, double in zip(one, two, strict=True):
        assert double["negative_probability"] == single["negative_probability"]
        # Dropout masks differ per process, so the training loss agrees less closely than validation.
        assert double["train_loss"] == pytest.approx(single["train_loss"], rel=3e-2)
        assert double["val_loss"] == pytest.approx(single["val_loss"], rel=2e-3)
        assert double["val_iou"] == pytest.approx(single["val_iou"], abs=1e-2)
        assert double["val_dice"] == pytest.approx(single["val_dice"], abs=2e-2)
    metrics = [json.loads((folders[n] / "metrics" / "segmenter.json").read_text()) for n in (1, 2)]
    assert metrics[1]["validation_tiles"] == metrics[0]["validation_tiles"] == 4
    assert metrics[1]["epochs_run"] == metrics[0]["epochs_run"] == 2


def test_a_batch_size_the_processes_cannot_split_is_refused_before_launching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from stages import train_segmenter
    from tests import test_train_segmenter as segmenter_tests
    from weakseg.stage import run_stage

    def no_launch(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("the stage launched processes for an impossible batch split")

    monkeypatch.setattr(launch, "relaunch", no_launch)
    segmenter_tests._write_project(
        tmp_path,
        {**segmenter_tests.TINY_SEGMENTER, "batch_size": 3, "distributed": {"processes_per_node": 2}},
    )
    monkeypatch.chdir(tmp_path)
    assert run_stage("train_segmenter", train_segmenter.run, argv=[]) == 2
    assert "segmenter.batch_size=3" in capsys.readouterr().err
    assert not (tmp_path / "models" / "segmenter.pt").exists()


def test_a_failed_launch_is_reported_as_a_stage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from stages import train_classifier
    from tests import test_train_classifier as classifier_tests

    launched: list[tuple[str, int, list[str]]] = []

    def failing_launch(module: str, processes: int, arguments: Any = ()) -> int:
        launched.append((module, processes, list(arguments)))
        return 1

    monkeypatch.setattr(launch, "relaunch", failing_launch)
    classifier_tests.make_dataset(tmp_path / "data" / "normalized")
    classifier_tests.write_params(tmp_path, {"distributed": {"processes_per_node": 2}})
    monkeypatch.chdir(tmp_path)
    assert train_classifier.main(["--params", "params.yaml"]) == 2
    assert launched == [("stages.train_classifier", 2, ["--params", "params.yaml"])]
    assert "exited with status 1" in capsys.readouterr().err


def test_batch_plan_from_headers_matches_the_decoded_batches(tmp_path: Path) -> None:
    from weakseg import cam_batches
    from weakseg.data.layout import Tile
    from weakseg.io import write_png

    sizes = [32, 32, 32, 48, 48, 32, 32, 32, 32, 32]
    tiles = []
    for index, size in enumerate(sizes):
        write_png(tmp_path / f"t{index}.png", np.full((size, size, 3), index, dtype=np.uint8))
        tiles.append(Tile(f"t{index}.png", "SSA", "train", True))
    decoded = [[tile.name for tile in batch] for batch, _ in cam_batches.same_size_batches(tiles, tmp_path, 3)]
    planned = [[tiles[index].name for index in batch] for batch in cam_batches.batch_plan(tiles, tmp_path, 3)]
    assert planned == decoded
    assert [len(batch) for batch in planned] == [3, 2, 3, 2]


def _simulate_rank(monkeypatch: pytest.MonkeyPatch, module: Any, rank: int, relay: list[Any]) -> None:
    """Makes ``module`` run as ``rank`` of 2 without processes: rank 1 runs first and records what it sends
    to each gather; rank 0 then receives those records as rank 1's shares.

    This replays the two ranks one after the other, which their stages allow because rank 1 never waits
    for data from rank 0. (The training stage tests above run real process groups.)
    """

    def gather(value: Any, context: DistributedContext) -> list[Any]:
        if rank == 1:
            relay.append(value)
            return [None, value]
        return [value, relay.pop(0)]

    monkeypatch.setattr(launch, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(launch, "init_distributed", lambda *args: DistributedContext(rank=rank, world_size=2))
    monkeypatch.setattr(launch, "leaving_process_group", lambda context: contextlib.nullcontext(context))
    monkeypatch.setattr(module, "gather_objects", gather)


def test_cams_sharded_over_two_ranks_equal_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage_store: str
) -> None:
    from stages import generate_cams
    from tests import test_cam
    from weakseg.stage import run_stage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stage_store)
    monkeypatch.chdir(tmp_path)
    tiles = test_cam._write_tiny_project(tmp_path)  # 3 tiles in batches of 2: one batch per rank
    assert run_stage("generate_cams", generate_cams.run, argv=[]) == 0
    one_process = {tile.name: (tmp_path / "data/cams" / tile.name).read_bytes() for tile in tiles}
    shutil.rmtree(tmp_path / "data/cams")
    runs_before = len(_runs_of("generate_cams", stage_store))

    relay: list[Any] = []
    _simulate_rank(monkeypatch, generate_cams, 1, relay)
    assert run_stage("generate_cams", generate_cams.run, argv=[]) == 0
    assert not (tmp_path / "data/cams").exists()  # rank 1 computes, rank 0 writes
    assert len(_runs_of("generate_cams", stage_store)) == runs_before
    assert [[name for name, *_ in share] for share in relay] == [["c.png"]]  # batch 1 of 2
    _simulate_rank(monkeypatch, generate_cams, 0, relay)
    assert run_stage("generate_cams", generate_cams.run, argv=[]) == 0
    assert len(_runs_of("generate_cams", stage_store)) == runs_before + 1
    assert sorted(path.name for path in (tmp_path / "data/cams").iterdir()) == sorted(one_process)
    for name, expected in one_process.items():
        assert (tmp_path / "data/cams" / name).read_bytes() == expected, name


def test_evaluation_sharded_over_two_ranks_equals_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage_store: str
) -> None:
    from stages import evaluate
    from tests import test_evaluate_stage
    from weakseg.stage import run_stage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stage_store)
    monkeypatch.chdir(tmp_path)
    test_evaluate_stage._build_project(tmp_path, with_truth=True)
    assert run_stage("evaluate", evaluate.run, argv=[]) == 0
    outputs = ("metrics/evaluate.json", "metrics/roc.csv", "metrics/confusion.csv")
    one_process = {name: (tmp_path / name).read_text() for name in outputs}
    for name in outputs:
        (tmp_path / name).unlink()

    relay: list[Any] = []
    _simulate_rank(monkeypatch, evaluate, 1, relay)
    assert run_stage("evaluate", evaluate.run, argv=[]) == 0
    assert not any((tmp_path / name).exists() for name in outputs)
    test_tiles = json.loads(one_process["metrics/evaluate.json"])["tiles"]["test"]
    assert len(relay[0]) == test_tiles // 2  # rank 1 scored every second tile
    _simulate_rank(monkeypatch, evaluate, 0, relay)
    assert run_stage("evaluate", evaluate.run, argv=[]) == 0
    two_processes = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    sharded, single = _flatten(two_processes), _flatten(json.loads(one_process["metrics/evaluate.json"]))
    words = {key for key, value in single.items() if isinstance(value, str)}  # settings such as the gate
    assert {key: sharded[key] for key in words} == {key: single[key] for key in words}
    numbers = {key: value for key, value in single.items() if key not in words}
    assert {key: sharded[key] for key in numbers} == pytest.approx(numbers, rel=1e-6)
    assert set(sharded) == set(single)
    assert (tmp_path / "metrics/roc.csv").read_text() == one_process["metrics/roc.csv"]
    assert (tmp_path / "metrics/confusion.csv").read_text() == one_process["metrics/confusion.csv"]


def _flatten(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in document.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
