"""Wall time of the default demo's ``dvc repro`` from an empty cache, per stage, and after one CRF change.

Runs in a fresh git + DVC copy of the project (``tools.project_copy``), so the developer's outputs and
cache are untouched. Each stage is reproduced on its own (``dvc repro --single-item``) so its time is its own.
The finished copy is kept (its path is in the result) for a person to look at.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tools.project_copy import PROJECT_ROOT, STAGES, commit_all, dvc, make_project, stages_run

WORKSPACE = Path(tempfile.gettempdir()) / "weakseg-bench-demo"


def run(params_file: Path | None = None, workspace: Path = WORKSPACE) -> dict[str, Any]:
    """Reproduces the pipeline stage by stage and times it.

    Args:
        params_file: the params to run (default: the project's params.yaml, the demo).
        workspace: where the copy is made (emptied first).
    """
    import shutil

    shutil.rmtree(workspace, ignore_errors=True)
    workspace.mkdir(parents=True)
    project = make_project(workspace / "project", params_file or PROJECT_ROOT / "params.yaml")
    per_stage: dict[str, float] = {}
    for stage in STAGES:
        started = time.perf_counter()
        result = dvc("repro", "--single-item", stage, cwd=project)
        per_stage[stage] = round(time.perf_counter() - started, 1)
        if stages_run(result.stdout) != [stage]:
            raise RuntimeError(f"expected dvc to run {stage}, it ran {stages_run(result.stdout)}")
    commit_all(project, "demo run")
    demo_metrics = {path.stem: json.loads(path.read_text()) for path in sorted((project / "metrics").glob("*.json"))}

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["refine"]["crf"]["bilateral"]["srgb"] = float(params["refine"]["crf"]["bilateral"]["srgb"]) + 2.0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.perf_counter()
    after_change = dvc("repro", cwd=project)
    crf_seconds = round(time.perf_counter() - started, 1)
    rerun = stages_run(after_change.stdout)
    # Put the demo's params back (DVC restores those outputs from its run cache) so that the kept copy
    # holds the default run.
    (project / "params.yaml").write_text(
        (PROJECT_ROOT / "params.yaml").read_text() if params_file is None else params_file.read_text()
    )
    dvc("repro", cwd=project)
    return {
        "project": str(project),
        "per_stage_seconds": per_stage,
        "total_seconds": round(sum(per_stage.values()), 1),
        "after_crf_change": {"seconds": crf_seconds, "stages_run": ", ".join(rerun)},
        "demo_metrics": demo_metrics,
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
