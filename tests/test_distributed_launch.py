"""The frame every multi-process stage runs in: when it re-launches, joins the group, or works alone."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from weakseg.distributed import DeviceError, DistributedBatchError, DistributedContext, launch
from weakseg.distributed.launch import StageRelaunch, run_distributed_stage
from weakseg.errors import UserInputError


class _StageInputError(UserInputError):
    """Stands in for a stage's own error class (EvaluateInputError)."""


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Records re-launches, group joins and leaves instead of doing them; not started by torchrun."""
    recorded: dict[str, list[Any]] = {"relaunch": [], "init": [], "left": []}

    def relaunch(module: str, processes: int, arguments: Any = ()) -> int:
        recorded["relaunch"].append((module, processes, list(arguments)))
        return 0

    def init_distributed(backend: str, device: str) -> DistributedContext:
        recorded["init"].append((backend, device))
        return DistributedContext(device=torch.device("cpu"))

    @contextlib.contextmanager
    def leaving(context: DistributedContext) -> Iterator[DistributedContext]:
        yield context
        recorded["left"].append(context)

    monkeypatch.setattr(launch, "launched_by_torchrun", lambda: False)
    monkeypatch.setattr(launch, "relaunch", relaunch)
    monkeypatch.setattr(launch, "init_distributed", init_distributed)
    monkeypatch.setattr(launch, "leaving_process_group", leaving)
    return recorded


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, calls: dict[str, list[Any]]) -> None:
    """Makes the stage look started by torchrun as ``rank`` of 2."""

    def init_distributed(backend: str, device: str) -> DistributedContext:
        calls["init"].append((backend, device))
        return DistributedContext(rank=rank, world_size=2)

    monkeypatch.setattr(launch, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(launch, "init_distributed", init_distributed)


def test_an_inference_stage_outside_torchrun_works_alone_without_a_context(calls: dict[str, list[Any]]) -> None:
    seen: list[DistributedContext | None] = []
    run_distributed_stage("evaluate", "cuda", seen.append, device_error=_StageInputError)
    assert seen == [None]
    assert calls == {"relaunch": [], "init": [], "left": []}  # the stage chooses its device itself


def test_a_one_process_training_stage_works_in_a_one_process_context(calls: dict[str, list[Any]]) -> None:
    seen: list[DistributedContext] = []
    relaunch = StageRelaunch("stages.train_segmenter", 1, 4, ["--params", "p.yaml"])
    run_distributed_stage("segmenter", "cpu", seen.append, relaunch=relaunch, backend="gloo")
    assert calls["relaunch"] == [] and calls["init"] == [("gloo", "cpu")]
    assert seen == calls["left"] == [DistributedContext(device=torch.device("cpu"))]


def test_a_training_stage_with_several_processes_relaunches_itself(calls: dict[str, list[Any]]) -> None:
    seen: list[DistributedContext] = []
    relaunch = StageRelaunch("stages.train_classifier", 2, 4, ["--params", "p.yaml"])
    run_distributed_stage("classifier", "cpu", seen.append, relaunch=relaunch)
    assert calls["relaunch"] == [("stages.train_classifier", 2, ["--params", "p.yaml"])]
    assert seen == [] and calls["init"] == []  # the launched processes do the work


def test_a_batch_the_processes_cannot_split_is_refused_before_relaunching(calls: dict[str, list[Any]]) -> None:
    relaunch = StageRelaunch("stages.train_classifier", 2, 3)
    with pytest.raises(DistributedBatchError, match=r"classifier\.batch_size=3"):
        run_distributed_stage("classifier", "cpu", lambda context: None, relaunch=relaunch)
    assert calls["relaunch"] == []


@pytest.mark.parametrize("relaunch", [None, StageRelaunch("stages.train_segmenter", 2, 4)])
def test_under_torchrun_every_stage_joins_and_only_rank_0_keeps_info_logs(
    monkeypatch: pytest.MonkeyPatch, calls: dict[str, list[Any]], relaunch: StageRelaunch | None
) -> None:
    root = logging.getLogger()
    original = root.level
    try:
        for rank, level in ((0, logging.INFO), (1, logging.WARNING)):
            root.setLevel(logging.INFO)
            _as_rank(monkeypatch, rank, calls)
            seen: list[DistributedContext | None] = []
            run_distributed_stage("cam", "auto", seen.append, relaunch=relaunch)
            assert seen == [DistributedContext(rank=rank, world_size=2)]
            assert root.level == level
    finally:
        root.setLevel(original)
    assert calls["relaunch"] == [] and calls["init"] == [("auto", "auto")] * 2 and len(calls["left"]) == 2


def test_an_unavailable_device_is_the_stages_error_or_stays_a_runtime_error(
    monkeypatch: pytest.MonkeyPatch, calls: dict[str, list[Any]]
) -> None:
    def no_gpu(backend: str, device: str) -> DistributedContext:
        raise RuntimeError("no CUDA GPU is available")

    monkeypatch.setattr(launch, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(launch, "init_distributed", no_gpu)
    with pytest.raises(_StageInputError, match=r"^evaluate\.device: no CUDA GPU"):
        run_distributed_stage("evaluate", "cuda", lambda context: None, device_error=_StageInputError)
    with pytest.raises(DeviceError, match=r"^segmenter\.device: no CUDA GPU"):
        run_distributed_stage("segmenter", "cuda", lambda context: None, relaunch=StageRelaunch("m", 1, 4))
    with pytest.raises(RuntimeError, match="^no CUDA GPU"):
        run_distributed_stage("cam", "cuda", lambda context: None, device_error=None)
    assert calls["left"] == []


def test_a_training_stage_frame_relaunches_its_own_module_with_its_section_settings(
    calls: dict[str, list[Any]],
) -> None:
    from weakseg.distributed.launch import run_training_stage
    from weakseg.params import ClassifierParams, DistributedParams

    settings = ClassifierParams(
        distributed=DistributedParams(processes_per_node=2, backend="gloo"), batch_size=8, device="cpu"
    )
    seen: list[DistributedContext] = []
    run_training_stage("train_classifier", "classifier", settings, seen.append, ["--params", "p.yaml"])
    assert calls["relaunch"] == [("stages.train_classifier", 2, ["--params", "p.yaml"])]
    one = ClassifierParams(distributed=DistributedParams(processes_per_node=1, backend="gloo"), device="cpu")
    run_training_stage("train_classifier", "classifier", one, seen.append)
    assert calls["init"] == [("gloo", "cpu")] and seen == [DistributedContext(device=torch.device("cpu"))]
