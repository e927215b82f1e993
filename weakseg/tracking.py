"""MLflow: where the store is, and one run per stage execution, grouped per pipeline execution.

The store is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<repository root>/mlflow.db``. Queued
DVC experiments run in a temporary copy under ``<root>/.dvc/tmp/exps/``; the root is taken from above that
folder, so every experiment lands in the same store as a plain ``dvc repro``.

Every run carries the tags ``weakseg.stage``, ``weakseg.pipeline`` (the DVC experiment name when DVC runs
one, else ``<git commit>-<params hash>``), ``weakseg.git_commit``, ``weakseg.params_hash`` and
``weakseg.dvc_experiment``, so ``mlflow ui`` can group the stages of one pipeline execution.

A stage killed mid-run (SIGKILL, a lost machine) cannot end its run, which MLflow would then show as
``RUNNING`` for ever; when the stage starts again in the same pipeline group, :func:`stage_run` marks such
runs ``KILLED`` (MLflow's status for a run that ended abnormally).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from weakseg.flatten import flatten

EXPERIMENT_NAME = "weakseg"
LOGGER = logging.getLogger(__name__)
_EXPERIMENT_WORKSPACES = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep


def project_root(start: str | Path | None = None) -> Path:
    """The DVC repository root that owns the MLflow store (the original one for queued experiments)."""
    candidate = os.environ.get("DVC_ROOT") or str(Path(start or os.getcwd()).resolve())
    if _EXPERIMENT_WORKSPACES in candidate + os.sep:
        return Path(candidate.split(_EXPERIMENT_WORKSPACES)[0])
    path = Path(candidate).resolve()
    for folder in (path, *path.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return path


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite file at the repository root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def _git_commit(root: Path) -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def _params_hash(root: Path) -> str:
    params_file = Path("params.yaml")
    if not params_file.is_file():
        params_file = root / "params.yaml"
    if not params_file.is_file():
        return "none"
    return hashlib.sha256(params_file.read_bytes()).hexdigest()[:12]


def pipeline_tags(stage: str) -> dict[str, str]:
    """The tags that name this stage execution and group it with its pipeline execution."""
    root = project_root()
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git_commit(root)
    params_hash = _params_hash(root)
    experiment = os.environ.get("DVC_EXP_NAME", "")
    group = os.environ.get("WEAKSEG_PIPELINE") or experiment or f"{commit[:10]}-{params_hash}"
    return {
        "weakseg.stage": stage,
        "weakseg.pipeline": group,
        "weakseg.git_commit": commit,
        "weakseg.params_hash": params_hash,
        "weakseg.dvc_experiment": experiment,
    }


def _quiet_mlflow() -> None:
    import logging

    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class StageRun:
    """A thin handle on the active MLflow run of one stage."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
        """Logs the numeric leaves of a (nested) mapping as ``prefix + a.b.c``."""
        import mlflow

        flat = {f"{prefix}{key}": float(value) for key, value in flatten(metrics).items() if _is_number(value)}
        if flat:
            mlflow.log_metrics(flat, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Copies a file into the run's artifacts."""
        import mlflow

        if Path(path).exists():
            mlflow.log_artifact(str(path), artifact_path=folder)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Adds tags to the run."""
        import mlflow

        mlflow.set_tags(dict(tags))

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """Logs one training-history row as metrics at step ``row["epoch"]`` (the epoch itself is the step)."""
        self.log_metrics({key: value for key, value in row.items() if key != "epoch"}, step=int(row["epoch"]))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def end_abandoned_runs(experiment_id: str, stage: str, pipeline: str) -> list[str]:
    """Marks ``KILLED`` the runs of ``stage`` in pipeline group ``pipeline`` that are still ``RUNNING``.

    A run is only left ``RUNNING`` by a process that died before it could end it; the stage starting
    again in the same group replaces it. Runs of other stages, and of other groups (a queued experiment
    running the same stage at the same time), are left alone.

    Args:
        experiment_id: the MLflow experiment to search.
        stage: the DVC stage name (``weakseg.stage``).
        pipeline: the pipeline group (``weakseg.pipeline``).

    Returns:
        The ids of the runs marked ``KILLED``.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    query = f"tags.`weakseg.stage` = '{stage}' AND attributes.status = 'RUNNING'"
    ended: list[str] = []
    page_token: str | None = None
    while True:
        page = client.search_runs([experiment_id], filter_string=query, max_results=1000, page_token=page_token)
        for run in page:
            # Compared here rather than in the query: a group name may hold any character.
            if run.data.tags.get("weakseg.pipeline") == pipeline:
                client.set_terminated(run.info.run_id, status="KILLED")
                ended.append(run.info.run_id)
        page_token = page.token
        if not page_token:
            break
    if ended:
        LOGGER.warning(
            "marked %d earlier %s run(s) of pipeline %s that never ended as KILLED: %s",
            len(ended),
            stage,
            pipeline,
            ", ".join(ended),
        )
    return ended


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None) -> Iterator[StageRun]:
    """Opens one MLflow run for a stage execution, tagged with its pipeline group.

    Earlier runs of the same stage and group still marked ``RUNNING`` (their process was killed) are
    first marked ``KILLED``. Call it from one process only (rank 0 of a distributed stage).

    Args:
        stage: the DVC stage name.
        params: flat parameters to record (``StageParams.to_flat_dict()``).
    """
    _quiet_mlflow()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.set_experiment(EXPERIMENT_NAME)
    tags = pipeline_tags(stage)
    end_abandoned_runs(experiment.experiment_id, stage, tags["weakseg.pipeline"])
    with mlflow.start_run(run_name=f"{stage} {tags['weakseg.pipeline']}", tags=tags) as run:
        if params:
            # MLflow limits a value to 6000 characters and a batch to 100 params.
            items = [(key, str(value)[:6000]) for key, value in params.items()]
            for start in range(0, len(items), 100):
                mlflow.log_params(dict(items[start : start + 100]))
        yield StageRun(run.info.run_id)


def scratch_tracking_uri() -> str:
    """A throwaway SQLite store (tests and benchmarks)."""
    folder = tempfile.mkdtemp(prefix="weakseg-mlflow-")
    return f"sqlite:///{folder}/mlflow.db"
