"""A stand-in for MLflow in stage tests that only need to see what a stage logs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


class RecordingTracker:
    """Records the metrics and artifacts a stage logs through ``weakseg.tracking.stage_run``."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.artifacts: list[str] = []

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, prefix: str = "") -> None:
        self.metrics.update({f"{prefix}{key}": value for key, value in metrics.items()})

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.artifacts.append(str(path))


def record_stage_run(
    monkeypatch: pytest.MonkeyPatch, module: ModuleType, stage: str, required_param: str
) -> RecordingTracker:
    """Replaces ``module.stage_run`` with a recorder that checks the stage name and one logged param."""
    recorder = RecordingTracker()

    @contextlib.contextmanager
    def fake_stage_run(name: str, params: dict[str, Any] | None = None) -> Iterator[RecordingTracker]:
        assert name == stage and params and required_param in params
        yield recorder

    monkeypatch.setattr(module, "stage_run", fake_stage_run)
    return recorder
