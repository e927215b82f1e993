"""Shared fixtures: tiny seeded data, an isolated MLflow store, the shared real dataset when present."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data" / "ebhi-hgin-polyp"


@pytest.fixture(scope="session")
def _empty_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised, empty MLflow SQLite store, made once: creating one runs migrations for ~15 s."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _isolated_mlflow(
    _empty_mlflow_store: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test gets its own MLflow store (a copy of the empty one); none writes to the project's."""
    folder = tmp_path_factory.mktemp("mlflow")
    shutil.copy2(_empty_mlflow_store, folder / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    """Small tensors run faster on one thread, and results do not depend on the core count."""
    torch.set_num_threads(1)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator."""
    return np.random.default_rng(1234)


@pytest.fixture
def shared_dataset() -> Path:
    """The real H&E set with pixel truth beside the repository; the test skips without it."""
    if not (SHARED_DATA / "annotations.csv").is_file():
        pytest.skip(f"{SHARED_DATA} is not present")
    return SHARED_DATA
