"""Tests of the MLflow stage runs (weakseg/tracking.py); each test has its own store (tests/conftest.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from weakseg.tracking import EXPERIMENT_NAME, stage_run, tracking_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def _client_and_experiment() -> tuple[MlflowClient, str]:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient(), mlflow.set_experiment(EXPERIMENT_NAME).experiment_id


def _left_running(client: MlflowClient, experiment_id: str, stage: str, pipeline: str) -> str:
    """A run as a SIGKILLed stage leaves it: created, tagged, never ended."""
    run = client.create_run(experiment_id, tags={"weakseg.stage": stage, "weakseg.pipeline": pipeline})
    assert run.info.status == "RUNNING"
    return run.info.run_id


def test_a_stage_starting_again_marks_its_killed_run_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEAKSEG_PIPELINE", "pipeline-a")
    client, experiment_id = _client_and_experiment()
    dead = _left_running(client, experiment_id, "train_segmenter", "pipeline-a")
    other_stage = _left_running(client, experiment_id, "train_classifier", "pipeline-a")
    other_pipeline = _left_running(client, experiment_id, "train_segmenter", "pipeline-b")  # a queued experiment

    with stage_run("train_segmenter", {"segmenter.epochs": 2}) as tracked:
        assert client.get_run(dead).info.status == "KILLED"
        new = tracked.run_id

    assert client.get_run(new).info.status == "FINISHED"
    assert client.get_run(new).data.tags["weakseg.pipeline"] == "pipeline-a"
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(dead).info.end_time is not None
    assert client.get_run(other_stage).info.status == "RUNNING"
    assert client.get_run(other_pipeline).info.status == "RUNNING"


def test_finished_runs_of_the_stage_are_left_finished(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEAKSEG_PIPELINE", "pipeline-a")
    with stage_run("refine_masks") as first:
        pass
    with stage_run("refine_masks") as second:
        pass
    client, _ = _client_and_experiment()
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert client.get_run(second.run_id).info.status == "FINISHED"
