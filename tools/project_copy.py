"""Fresh git + DVC copies of the project, and the real ``dvc`` run inside them.

The integration tests and the demo benchmark both need "a clean clone with these params"; this module is
the one place that knows what to copy and how to call DVC.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STAGES = ["download", "normalize", "train_classifier", "generate_cams", "refine_masks", "train_segmenter", "evaluate"]
# Outputs and local state, never copied from the developer's checkout.
NOT_COPIED = {".venv", ".git", ".bench", "data", "models", "metrics", "figures", "mlflow.db", "mlruns", ".pytest_cache", "results", "downloads"}


def environment() -> dict[str, str]:
    """The environment for stage processes: this interpreter's venv first, the default MLflow store."""
    variables = dict(os.environ)
    variables.pop("MLFLOW_TRACKING_URI", None)  # the store must default to <repository root>/mlflow.db
    variables["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{variables.get('PATH', '')}"
    variables["DVC_NO_ANALYTICS"] = "true"
    variables["GIT_AUTHOR_NAME"] = variables["GIT_COMMITTER_NAME"] = "weakseg"
    variables["GIT_AUTHOR_EMAIL"] = variables["GIT_COMMITTER_EMAIL"] = "weakseg@localhost"
    return variables


def run(command: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs a command in ``cwd``; on failure raises with its output."""
    result = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dvc(*arguments: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs this interpreter's DVC."""
    return run([sys.executable, "-m", "dvc", *arguments], cwd, check)


def stages_run(output: str) -> list[str]:
    """The stages a ``dvc repro`` executed, in order (stages restored from the run cache do not count)."""
    return re.findall(r"Running stage '([^']+)'", output)


def make_project(destination: Path, params_file: Path | None = None) -> Path:
    """A fresh git + DVC copy of the project's source, committed, with ``params_file`` as params.yaml."""
    destination.mkdir(parents=True)
    for entry in PROJECT_ROOT.iterdir():
        if entry.name in NOT_COPIED:
            continue
        target = destination / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy2(entry, target)
    if params_file is not None:
        shutil.copy2(params_file, destination / "params.yaml")
    run(["git", "init", "-q", "-b", "main"], destination)
    commit_all(destination, "fresh copy")
    return destination


def commit_all(project: Path, message: str) -> None:
    """Commits whatever DVC and the stages changed (dvc.lock, metrics, .gitignore files)."""
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "--allow-empty", "-m", message], project)


def copy_project(source: Path, destination: Path) -> Path:
    """A copy of a project with its git history, DVC cache and outputs."""
    shutil.copytree(source, destination, symlinks=True)
    return destination
