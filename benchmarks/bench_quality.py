"""Quality against pixel truth, with a trivial baseline and a fully supervised upper bound beside it.

For (a) the default synthetic demo and (b) the real H&E set ``../shared/data/ebhi-hgin-polyp`` (run as a
``folder`` source with ``presets/ebhi-cpu.yaml``), on the test partition and against the true masks:

- weak supervision: thresholded CAM, refined pseudo-masks, and the segmenter trained on pseudo-masks;
- trivial baseline: the whole tissue mask on every tile the classifier calls positive;
- upper bound: the same segmenter configuration trained on the true training masks (used only here).

The upper bound runs in a copy of the finished project whose ``data/pseudo_masks`` are replaced by the
truth, then ``train_segmenter`` and ``evaluate`` are run directly (not through DVC).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks import bench_demo
from tools import project_copy
from tools.project_copy import PROJECT_ROOT, copy_project, dvc, make_project

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data" / "ebhi-hgin-polyp"
WORKSPACE = Path(tempfile.gettempdir()) / "weakseg-bench-quality"
KEYS = ("iou", "dice", "miou")


def _pick(metrics: dict[str, Any], *path: str) -> dict[str, float] | None:
    value: Any = metrics
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return {key: round(float(value[key]), 4) for key in KEYS if key in value}


def upper_bound(project: Path, workspace: Path) -> dict[str, float] | None:
    """Trains the segmenter on the true masks in a copy of ``project`` and scores it against truth."""
    supervised = copy_project(project, workspace / "supervised")
    pseudo = supervised / "data" / "pseudo_masks"
    # DVC links outputs from its cache; replace the folder rather than writing through the links.
    shutil.rmtree(pseudo)
    shutil.copytree(supervised / "data" / "raw" / "masks", pseudo)
    for stage in ("train_segmenter", "evaluate"):
        project_copy.run([sys.executable, "-m", f"stages.{stage}"], supervised)
    metrics = json.loads((supervised / "metrics" / "evaluate.json").read_text())
    return _pick(metrics, "segmenter", "vs_truth")


def quality_of(project: Path, workspace: Path) -> dict[str, Any]:
    """The weak-supervision figures, the baseline and the upper bound for one finished project."""
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    weak = {
        "cam": _pick(metrics, "cam", "vs_truth"),
        "pseudo_masks": _pick(metrics, "pseudo", "vs_truth"),
        "segmenter": _pick(metrics, "segmenter", "vs_truth"),
        "segmenter_vs_pseudo": _pick(metrics, "segmenter", "vs_pseudo"),
    }
    baseline = _pick(metrics, "baseline", "tissue_if_classified_positive", "vs_truth")
    bound = upper_bound(project, workspace)
    gap = None
    if bound and weak["segmenter"]:
        gap = round(bound["iou"] - weak["segmenter"]["iou"], 4)
    return {
        "weak": weak,
        "trivial_baseline": baseline,
        "fully_supervised": bound,
        "iou_gap_full_minus_weak": gap,
        "classifier": {key: round(float(value), 4) for key, value in metrics.get("classifier", {}).items()},
    }


def _table(name: str, result: dict[str, Any]) -> list[str]:
    rows = [
        ("thresholded CAM", result["weak"]["cam"]),
        ("refined pseudo-masks", result["weak"]["pseudo_masks"]),
        ("segmenter (trained on pseudo-masks)", result["weak"]["segmenter"]),
        ("trivial baseline: tissue mask if classifier says positive", result["trivial_baseline"]),
        ("upper bound: segmenter trained on true masks", result["fully_supervised"]),
    ]
    lines = [f"**{name}** (test partition, against true masks, pooled over all test pixels)", "",
             "| method | IoU | Dice | mIoU |", "| --- | --- | --- | --- |"]
    for label, values in rows:
        values = values or {}
        lines.append(f"| {label} | " + " | ".join(f"{values[key]:.3f}" if key in values else "—" for key in KEYS) + " |")
    lines.append("")
    lines.append(f"Gap in IoU between full and weak supervision: {result['iou_gap_full_minus_weak']}.")
    return lines


def run() -> dict[str, Any]:
    """Both datasets (the real one only where ``../shared/data`` is present)."""
    shutil.rmtree(WORKSPACE, ignore_errors=True)
    WORKSPACE.mkdir(parents=True)
    results: dict[str, Any] = {}
    demo_project = bench_demo.WORKSPACE / "project"
    if not (demo_project / "metrics" / "evaluate.json").is_file():
        bench_demo.run()
    results["synthetic_demo"] = quality_of(demo_project, WORKSPACE / "demo")

    if (SHARED_DATA / "annotations.csv").is_file():
        params = yaml.safe_load((PROJECT_ROOT / "presets" / "ebhi-cpu.yaml").read_text())
        params["data"]["folder"]["path"] = str(SHARED_DATA)
        params_file = WORKSPACE / "ebhi-params.yaml"
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        project = make_project(WORKSPACE / "ebhi" / "project", params_file)
        dvc("repro", cwd=project)
        results["ebhi_hgin_polyp"] = quality_of(project, WORKSPACE / "ebhi")
    else:
        results["ebhi_hgin_polyp"] = {"skipped": f"{SHARED_DATA} not present"}

    lines: list[str] = []
    for name, label in (("synthetic_demo", "Synthetic demo (params.yaml)"), ("ebhi_hgin_polyp", "EBHI HGIN/Polyp, real H&E (presets/ebhi-cpu.yaml)")):
        if "weak" in results[name]:
            lines += _table(label, results[name]) + [""]
        else:
            lines += [f"**{label}**: {results[name]['skipped']}", ""]
    results["markdown"] = "\n".join(lines)
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
