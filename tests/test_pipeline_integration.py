"""The DVC workflow end to end, with the real ``dvc`` and ``mlflow`` on the tiny preset.

Each test works in a fresh temporary git + DVC copy of the project. One full ``dvc repro`` (the baseline)
is shared by the module; tests that change things copy it first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.metric_keys import evaluate_metric_names, missing_metrics
from tools.project_copy import (
    PROJECT_ROOT,
    STAGES,
    commit_all,
    copy_project,
    dvc,
    environment,
    make_project,
    run,
    stages_run,
)

pytestmark = pytest.mark.integration
TINY = PROJECT_ROOT / "presets" / "tiny.yaml"


def set_param(project: Path, keys: list[str], value: object) -> None:
    """Edits one key of params.yaml, as a user would."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    section = params
    for key in keys[:-1]:
        section = section[key]
    section[keys[-1]] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@dataclass
class Baseline:
    """The tiny pipeline reproduced from scratch twice, side by side."""

    project: Path
    first_output: str
    second_output: str
    independent: Path


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baseline]:
    """Two fresh projects reproduced at the same time (one thread each), then a second repro of the first.

    The first project's DVC cache lives outside it, so the copies that later tests make share its cache
    and run cache, as clones on one machine configured with the same ``cache.dir`` would. The second
    project keeps a cache of its own: it is the independent run the determinism test compares against.
    """
    folder = tmp_path_factory.mktemp("baseline")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        project = make_project(folder / "project", TINY)
        dvc("cache", "dir", str(folder / "shared-cache"), cwd=project)
        commit_all(project, "shared cache")
        independent = make_project(folder / "independent", TINY)
        runs = [
            subprocess.Popen(
                [sys.executable, "-m", "dvc", "repro"],
                cwd=path,
                env=environment(),
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for path in (project, independent)
        ]
        outputs = [process.communicate()[0] for process in runs]
        for process, output in zip(runs, outputs, strict=True):
            assert process.returncode == 0, output
        second = dvc("repro", cwd=project)
        commit_all(project, "baseline run")
        yield Baseline(project, outputs[0], second.stdout, independent)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage process of these tests runs on one thread, as the baseline did (same floating-point order)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_repro_runs_all_seven_stages_then_none(baseline: Baseline) -> None:
    project = baseline.project
    assert stages_run(baseline.first_output) == STAGES
    assert stages_run(baseline.second_output) == []
    for path in ["models/classifier.pt", "models/segmenter.pt", "metrics/evaluate.json", "metrics/pseudo_masks.json"]:
        assert (project / path).is_file(), path
    dag = dvc("dag", "--md", cwd=project).stdout
    for stage in STAGES:
        assert stage in dag


def test_evaluate_metrics_hold_the_contract_keys(baseline: Baseline) -> None:
    """Every dotted name of PIPELINE.md's list (truth rows included: the synthetic source has masks) is a
    number in metrics/evaluate.json, and ``dvc metrics show`` reads the file with the same names."""
    project = baseline.project
    names = evaluate_metric_names()
    document = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert missing_metrics(document, names) == []
    # {revision: {"data": {path: {"data": document}}}}; the committed workspace is listed under its branch.
    shown = json.loads(dvc("metrics", "show", "--json", cwd=project).stdout)
    listed = [revision["data"]["metrics/evaluate.json"]["data"] for revision in shown.values()]
    assert listed, shown
    for entry in listed:
        assert missing_metrics(entry, names) == []


def test_changing_a_crf_parameter_reruns_exactly_the_downstream_stages(baseline: Baseline, tmp_path: Path) -> None:
    project = copy_project(baseline.project, tmp_path / "project")
    # A bilateral weight of 0 removes the CRF's colour term: the masks change, so the stages after it run.
    set_param(project, ["refine", "crf", "bilateral", "compat"], 0.0)
    result = dvc("repro", cwd=project)
    assert stages_run(result.stdout) == ["refine_masks", "train_segmenter", "evaluate"]


def test_experiments_with_two_refine_values_are_listed_with_metrics(baseline: Baseline, tmp_path: Path) -> None:
    project = copy_project(baseline.project, tmp_path / "project")
    for value in ("0.0", "20.0"):
        dvc("exp", "run", "-S", f"refine.crf.bilateral.compat={value}", cwd=project)
    shown = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    text = json.dumps(shown)
    found = {value: False for value in ("0.0", "20.0")}
    experiments: list[dict[str, Any]] = []
    for entry in shown:
        experiments.extend(entry.get("experiments") or [])
    for experiment in experiments:
        for run_record in experiment.get("revs", []):
            data = run_record.get("data", {})
            compat = (
                data.get("params", {})
                .get("params.yaml", {})
                .get("data", {})
                .get("refine", {})
                .get("crf", {})
                .get("bilateral", {})
                .get("compat")
            )
            metrics = data.get("metrics", {}).get("metrics/evaluate.json", {}).get("data", {})
            if compat is not None and metrics.get("segmenter"):
                found[f"{float(compat):.1f}"] = True
    assert all(found.values()), f"experiments not listed with evaluate metrics: {found}\n{text[:2000]}"


def test_push_clone_pull_leaves_nothing_to_run(baseline: Baseline, tmp_path: Path) -> None:
    project = copy_project(baseline.project, tmp_path / "project")
    remote = tmp_path / "remote"
    dvc("remote", "add", "-d", "shared", str(remote), cwd=project)
    commit_all(project, "add remote")
    dvc("push", cwd=project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    dvc("pull", cwd=clone)
    status = dvc("status", cwd=clone).stdout
    assert "up to date" in status, status
    assert stages_run(dvc("repro", cwd=clone).stdout) == []
    assert (clone / "models" / "segmenter.pt").read_bytes() == (project / "models" / "segmenter.pt").read_bytes()


def _pseudo_mask_bytes(project: Path) -> dict[str, bytes]:
    folder = project / "data" / "pseudo_masks"
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _metric_files(project: Path) -> dict[str, object]:
    return {path.name: json.loads(path.read_text()) for path in sorted((project / "metrics").glob("*.json"))}


def test_two_runs_from_scratch_are_identical(baseline: Baseline) -> None:
    project, other = baseline.project, baseline.independent
    assert _pseudo_mask_bytes(other) == _pseudo_mask_bytes(project)
    assert _strip_timings(_metric_files(project)) == _strip_timings(_metric_files(other))
    for model in ("classifier.pt", "segmenter.pt"):
        assert (other / "models" / model).read_bytes() == (project / "models" / model).read_bytes()


def _strip_timings(value: object) -> object:
    """Drops wall-clock fields, which no run can repeat."""
    if isinstance(value, dict):
        return {
            key: _strip_timings(inner)
            for key, inner in value.items()
            if "second" not in key and "per_second" not in key
        }
    if isinstance(value, list):
        return [_strip_timings(inner) for inner in value]
    return value


def test_mlflow_holds_one_run_per_stage_with_the_grouping_tag(baseline: Baseline) -> None:
    import mlflow

    project = baseline.project
    store = project / "mlflow.db"
    assert store.is_file(), "the MLflow store should default to <repository root>/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("weakseg")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    by_stage: dict[str | None, list[mlflow.entities.Run]] = {}
    for run_record in runs:
        by_stage.setdefault(run_record.data.tags.get("weakseg.stage"), []).append(run_record)
    tracked = STAGES
    for stage in tracked:
        assert len(by_stage.get(stage, [])) == 1, f"{stage}: {len(by_stage.get(stage, []))} runs"
    groups = {by_stage[stage][0].data.tags["weakseg.pipeline"] for stage in tracked}
    assert len(groups) == 1, groups
    assert by_stage["train_classifier"][0].data.metrics, "the classifier run has no metrics"
    assert by_stage["evaluate"][0].data.metrics, "the evaluation run has no metrics"


def test_sigkill_during_train_segmenter_then_repro_recovers(baseline: Baseline, tmp_path: Path) -> None:
    project = copy_project(baseline.project, tmp_path / "project")
    expected = json.loads((project / "metrics" / "segmenter.json").read_text())
    # `device: cpu` instead of `auto` changes nothing on this machine but is a new parameter value, so DVC
    # has no cached result: the stage must really run, be killed, and run again.
    set_param(project, ["segmenter", "device"], "cpu")
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=project,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not _stage_process_running("stages.train_segmenter", project):
            time.sleep(0.2)
        assert _stage_process_running("stages.train_segmenter", project), "train_segmenter never started"
        time.sleep(4.0)  # into training
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert (
        not (project / "models" / "segmenter.pt").exists()
        or json.loads((project / "metrics" / "segmenter.json").read_text()) == expected
    )
    result = dvc("repro", cwd=project)
    assert "train_segmenter" in stages_run(result.stdout)
    assert json.loads((project / "metrics" / "segmenter.json").read_text()) == expected
    assert not list((project / "models").glob(".*.tmp")), "a temporary file was left behind"


def _stage_process_running(module: str, project: Path) -> bool:
    import psutil  # type: ignore[import-untyped]

    for process in psutil.process_iter(["cmdline", "cwd"]):
        if module in (process.info.get("cmdline") or []) and process.info.get("cwd") == str(project):
            return True
    return False
