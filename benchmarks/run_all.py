"""Runs every benchmark and writes ``results/benchmarks.json`` and ``results/benchmarks.md``.

Each ``benchmarks/bench_<thing>.py`` has ``run() -> dict``; timings there are medians after a warm-up.
This script adds the machine's description, the targets the stage issues set, and whether each was met.

    python -m benchmarks.run_all [--only NAME ...] [--skip NAME ...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path("results")
BENCHMARKS = [
    "bench_synthetic",
    "bench_normalize",
    "bench_train_classifier",
    "bench_cams",
    "bench_refine",
    "bench_train_segmenter",
    "bench_predict",
    "bench_demo",
]

# (benchmark, key in its result, comparison, target, what the issue asked)
TARGETS = [
    (
        "bench_synthetic",
        "projected_cpu_seconds_for_500_tiles",
        "<=",
        30.0,
        "500 synthetic tiles generate in under 30 s on one core",
    ),
    (
        "bench_normalize",
        "seconds_for_3152_tiles",
        "<=",
        60.0,
        "normalizing 3,152 tiles of 224x224 takes under 60 s on 2 cores",
    ),
    ("bench_normalize", "pool_speedup", ">=", 1.5, "normalize process-pool speed-up on 2 cores"),
    ("bench_normalize", "speed_ratio_vs_torchstain", ">=", 1.0, "own Macenko faster than torchstain's"),
    ("bench_train_classifier", "ratio", ">=", 0.9, "classifier training throughput / bare forward+backward"),
    (
        "bench_refine",
        "projected_mhist_seconds_parallel",
        "<=",
        300.0,
        "refining 3,152 tiles takes under 5 minutes on 2 cores",
    ),
    ("bench_refine", "speedup", ">=", 1.7, "refine_masks process-pool speed-up over one worker"),
    ("bench_train_segmenter", "ratio", ">=", 0.9, "segmenter training throughput / bare forward+backward"),
    ("bench_predict", "ratio_to_bare_forward", ">=", 0.8, "predict throughput / bare model forward"),
    ("bench_demo", "total_seconds", "<=", 600.0, "the default demo's dvc repro from an empty cache, under 10 minutes"),
]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _lookup(results: dict[str, Any], key: str) -> Any:
    value: Any = results
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def check_targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it was met (missing measurements are listed too)."""
    rows = []
    for name, key, comparison, target, description in TARGETS:
        measured = _lookup(results.get(name, {}), key)
        if isinstance(measured, (int, float)):
            met = measured <= target if comparison == "<=" else measured >= target
        else:
            met = None
        rows.append(
            {
                "benchmark": name,
                "key": key,
                "target": f"{comparison} {target}",
                "measured": measured,
                "met": met,
                "what": description,
            }
        )
    return rows


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def to_markdown(report: dict[str, Any]) -> str:
    """The results file a person reads."""
    lines = ["# weakseg benchmark results", "", "Produced by `make bench` (`python -m benchmarks.run_all`).", ""]
    lines += ["## Machine", "", "| what | value |", "| --- | --- |"]
    lines += [f"| {key} | {_format(value)} |" for key, value in report["machine"].items()]
    lines += ["", "## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
    for row in report["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[row["met"]]
        lines.append(f"| {row['what']} ({row['target']}) | {_format(row['measured'])} | {met} |")
    for name, result in report["results"].items():
        lines += ["", f"## {name}", ""]
        if "markdown" in result:
            lines.append(result["markdown"])
            continue
        lines += ["| measure | value |", "| --- | --- |"]
        for key, value in _flatten(result).items():
            lines.append(f"| {key} | {_format(value)} |")
    return "\n".join(lines) + "\n"


def _flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        if isinstance(inner, dict):
            flat.update(_flatten(inner, f"{prefix}{key}."))
        elif not isinstance(inner, list):
            flat[f"{prefix}{key}"] = inner
    return flat


def main(argv: list[str] | None = None) -> int:
    """Runs the selected benchmarks and writes the results files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="benchmarks to run (default: all)")
    parser.add_argument("--skip", nargs="*", default=[], help="benchmarks to leave out")
    parser.add_argument("--output", default=str(RESULTS), help="results folder")
    parser.add_argument("--report-only", action="store_true", help="rewrite the results files from benchmarks.json")
    arguments = parser.parse_args(argv)
    selected = [name for name in (arguments.only or BENCHMARKS) if name not in arguments.skip]
    if arguments.report_only:
        selected = []
    output = Path(arguments.output)
    previous = output / "benchmarks.json"
    results: dict[str, Any] = json.loads(previous.read_text())["results"] if previous.is_file() else {}
    for name in selected:
        print(f"== {name}", file=sys.stderr, flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        started = time.perf_counter()
        results[name] = module.run()
        results[name]["benchmark_wall_seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(results[name], indent=2, default=str)[:2000], file=sys.stderr, flush=True)
        write_report(output, results)  # after each benchmark, so a long run keeps what it measured
    write_report(output, results)
    print(f"wrote {output / 'benchmarks.md'}", file=sys.stderr)
    return 0


def write_report(output: Path, results: dict[str, Any]) -> None:
    """Writes ``benchmarks.json`` and ``benchmarks.md`` for the results so far."""
    report = {"machine": machine(), "results": results, "targets": check_targets(results)}
    output.mkdir(parents=True, exist_ok=True)
    (output / "benchmarks.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    (output / "benchmarks.md").write_text(to_markdown(report))


if __name__ == "__main__":
    raise SystemExit(main())
