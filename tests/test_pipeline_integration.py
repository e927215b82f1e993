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
from pathlib import Path

import pytest
import yaml

from tools.project_copy import PROJECT_ROOT, STAGES, commit_all, copy_project, dvc, environment, make_project, run, stages_run

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


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """One complete ``dvc repro`` of the tiny preset, its output, and a second repro's output."""
    project = make_project(tmp_path_factory.mktemp("baseline") / "project", TINY)
    first = dvc("repro", cwd=project)
    second = dvc("repro", cwd=project)
    commit_all(project, "baseline run")
    return project, first.stdout, second.stdout


def test_repro_runs_all_seven_stages_then_none(baseline: tuple[Path, str, str]) -> None:
    project, first, second = baseline
    assert stages_run(first) == STAGES
    assert stages_run(second) == []
    for path in ["models/classifier.pt", "models/segmenter.pt", "metrics/evaluate.json", "metrics/pseudo_masks.json"]:
        assert (project / path).is_file(), path
    dag = dvc("dag", "--md", cwd=project).stdout
    for stage in STAGES:
        assert stage in dag


def test_evaluate_metrics_hold_the_contract_keys(baseline: tuple[Path, str, str]) -> None:
    project, _, _ = baseline
    shown = json.loads(dvc("metrics", "show", "--json", cwd=project).stdout)
    text = json.dumps(shown)
    for key in ["accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "vs_pseudo", "vs_truth", "iou_positive_mean"]:
        assert key in text, key


def test_changing_a_crf_parameter_reruns_exactly_the_downstream_stages(
    baseline: tuple[Path, str, str], tmp_path: Path
) -> None:
    project = copy_project(baseline[0], tmp_path / "project")
    # A bilateral weight of 0 removes the CRF's colour term: the masks change, so the stages after it run.
    set_param(project, ["refine", "crf", "bilateral", "compat"], 0.0)
    result = dvc("repro", cwd=project)
    assert stages_run(result.stdout) == ["refine_masks", "train_segmenter", "evaluate"]


def test_experiments_with_two_refine_values_are_listed_with_metrics(
    baseline: tuple[Path, str, str], tmp_path: Path
) -> None:
    project = copy_project(baseline[0], tmp_path / "project")
    for value in ("0.0", "20.0"):
        dvc("exp", "run", "-S", f"refine.crf.bilateral.compat={value}", cwd=project)
    shown = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    text = json.dumps(shown)
    found = {value: False for value in ("0.0", "20.0")}
    experiments = []
    for entry in shown:
        experiments.extend(entry.get("experiments") or [])
    for experiment in experiments:
        for run_record in experiment.get("revs", []):
            data = run_record.get("data", {})
            compat = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("refine", {}).get("crf", {}).get("bilateral", {}).get("compat")
            metrics = data.get("metrics", {}).get("metrics/evaluate.json", {}).get("data", {})
            if compat is not None and metrics.get("segmenter"):
                found[f"{float(compat):.1f}"] = True
    assert all(found.values()), f"experiments not listed with evaluate metrics: {found}\n{text[:2000]}"


def test_push_clone_pull_leaves_nothing_to_run(baseline: tuple[Path, str, str], tmp_path: Path) -> None:
    project = copy_project(baseline[0], tmp_path / "project")
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


def test_two_runs_from_scratch_are_identical(baseline: tuple[Path, str, str], tmp_path: Path) -> None:
    other = make_project(tmp_path / "project", TINY)
    dvc("repro", cwd=other)
    project = baseline[0]
    assert _pseudo_mask_bytes(other) == _pseudo_mask_bytes(project)
    first, second = _metric_files(project), _metric_files(other)
    for name in first:
        if name in {"normalize.json"}:
            first[name].pop("seconds", None), second[name].pop("seconds", None)
    assert _strip_timings(first) == _strip_timings(second)
    assert (other / "models" / "segmenter.pt").read_bytes() == (project / "models" / "segmenter.pt").read_bytes()


def _strip_timings(value: object) -> object:
    """Drops wall-clock fields, which no run can repeat."""
    if isinstance(value, dict):
        return {key: _strip_timings(inner) for key, inner in value.items() if "second" not in key and "per_second" not in key}
    if isinstance(value, list):
        return [_strip_timings(inner) for inner in value]
    return value


def test_mlflow_holds_one_run_per_stage_with_the_grouping_tag(baseline: tuple[Path, str, str]) -> None:
    import mlflow

    project = baseline[0]
    store = project / "mlflow.db"
    assert store.is_file(), "the MLflow store should default to <repository root>/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("weakseg")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    by_stage = {}
    for run_record in runs:
        by_stage.setdefault(run_record.data.tags.get("weakseg.stage"), []).append(run_record)
    tracked = [stage for stage in STAGES if stage != "download"]
    for stage in tracked:
        assert len(by_stage.get(stage, [])) == 1, f"{stage}: {len(by_stage.get(stage, []))} runs"
    groups = {by_stage[stage][0].data.tags["weakseg.pipeline"] for stage in tracked}
    assert len(groups) == 1, groups
    assert by_stage["train_classifier"][0].data.metrics, "the classifier run has no metrics"
    assert by_stage["evaluate"][0].data.metrics, "the evaluation run has no metrics"


def test_sigkill_during_train_segmenter_then_repro_recovers(baseline: tuple[Path, str, str], tmp_path: Path) -> None:
    project = copy_project(baseline[0], tmp_path / "project")
    expected = json.loads((project / "metrics" / "segmenter.json").read_text())
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "train_segmenter"],
        cwd=project,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _stage_process_running("stages.train_segmenter"):
            time.sleep(0.2)
        assert _stage_process_running("stages.train_segmenter"), "train_segmenter never started"
        time.sleep(3.0)  # let it get into training
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    result = dvc("repro", "--no-run-cache", cwd=project)
    assert "train_segmenter" in stages_run(result.stdout)
    assert json.loads((project / "metrics" / "segmenter.json").read_text()) == expected
    assert not list((project / "models").glob(".*.tmp")), "a temporary file was left behind"


def _stage_process_running(module: str) -> bool:
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if module in cmdline:
            return True
    return False
