"""The quality benchmark's bookkeeping: rows from finished runs, mean ± sd, the regression check, the README."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import bench_quality


def _evaluate_json(weak: float, trivial: float) -> dict[str, Any]:
    def scores(iou: float) -> dict[str, float]:
        return {"iou": iou, "dice": 2 * iou / (1 + iou), "miou": (1 + iou) / 2}

    return {
        "segmenter": {"vs_truth": scores(weak)},
        "baseline": {
            "tissue_if_classified_positive": {"vs_truth": scores(trivial)},
            "tissue_if_label_positive_oracle_label": {"vs_truth": scores(trivial + 0.05)},
        },
        "cam": {"vs_truth": scores(0.4)},
        "pseudo": {"vs_truth": scores(0.45)},
    }


def _runs(dataset: str, weak: list[float], trivial: float, full: float) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for seed, weak_iou in enumerate(weak):
        runs[f"{dataset}/weakseg/{seed}"] = {"seconds": 10.0, "metrics": _evaluate_json(weak_iou, trivial)}
        runs[f"{dataset}/fully_supervised/{seed}"] = {"seconds": 20.0, "metrics": _evaluate_json(full, trivial)}
    return runs


def test_rows_hold_one_value_per_finished_seed_in_seed_order() -> None:
    runs = _runs("demo", [0.5, 0.7], trivial=0.4, full=0.8)
    table = bench_quality.quality_table(runs, ["demo"], [0, 1, 2])
    section = table["demo"]
    assert section["seeds"] == [0, 1]  # seed 2 has not run yet
    assert section["methods"]["weakseg"]["iou"] == [0.5, 0.7]
    assert section["methods"]["tissue_if_classified_positive"]["iou"] == [0.4, 0.4]
    assert section["methods"]["tissue_if_label_positive_oracle_label"]["iou"] == [0.45, 0.45]
    assert section["methods"]["fully_supervised"]["seconds"] == [20.0, 20.0]
    assert "paper" not in section["methods"]
    assert list(section["methods"]) == [row for row in bench_quality.ROW_ORDER if row in section["methods"]]
    markdown = bench_quality.to_markdown({"machine": bench_quality.machine(), "datasets": table, "regressions": []})
    assert "| `weakseg` |" in markdown and "0.600 ± 0.141" in markdown


def test_regression_check_names_the_row_that_falls_below_its_floor() -> None:
    runs = {
        **_runs("demo", [0.5, 0.5, 0.5], trivial=0.4, full=0.8),
        **_runs("ebhi-hgin-polyp", [0.5, 0.6, 0.55], 0.6, 0.7),
    }
    table = bench_quality.quality_table(runs, ["demo", "ebhi-hgin-polyp"], [0, 1, 2])
    failures = bench_quality.regressions(table)
    assert len(failures) == 2
    assert failures[0].startswith("ebhi-hgin-polyp: weakseg IoU 0.550 is below tissue_if_classified_positive 0.600")
    assert "fully_supervised IoU 0.700 is below 0.75" in failures[1]
    healthy = bench_quality.quality_table(
        _runs("ebhi-hgin-polyp", [0.8, 0.8, 0.8], 0.6, 0.78), ["ebhi-hgin-polyp"], [0, 1, 2]
    )
    assert bench_quality.regressions(healthy) == []


def test_rows_without_runs_are_carried_over_from_the_committed_results() -> None:
    previous = {
        **bench_quality.quality_table(
            _runs("ebhi-hgin-polyp", [0.6, 0.6, 0.6], 0.6, 0.78), ["ebhi-hgin-polyp"], [0, 1, 2]
        ),
        **bench_quality.quality_table(_runs("demo", [0.3, 0.3, 0.3], 0.2, 0.9), ["demo"], [0, 1, 2]),
    }
    previous["demo"]["methods"]["paper"] = {
        "iou": [0.1, 0.1, 0.1],
        "dice": [0.2] * 3,
        "miou": [0.5] * 3,
        "seconds": [1.0] * 3,
    }
    now = {"demo/weakseg/0": {"seconds": 10.0, "metrics": _evaluate_json(0.55, 0.4)}}
    table = bench_quality.carry_over(bench_quality.quality_table(now, ["demo"], [0, 1, 2]), previous)
    assert list(table) == ["ebhi-hgin-polyp", "demo"]  # a dataset not run now is kept whole, in place
    assert table["ebhi-hgin-polyp"] == previous["ebhi-hgin-polyp"]
    demo = table["demo"]["methods"]
    assert demo["weakseg"]["iou"] == [0.55]  # rows with runs now are replaced ...
    assert demo["tissue_if_classified_positive"]["iou"] == [0.4]
    assert demo["paper"]["iou"] == [0.1, 0.1, 0.1]  # ... rows without are kept
    assert demo["fully_supervised"]["iou"] == [0.9, 0.9, 0.9]
    assert list(demo) == [row for row in bench_quality.ROW_ORDER if row in demo]
    assert bench_quality.carry_over({}, {}) == {}


def test_the_readme_table_is_replaced_between_its_markers_only(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    start, end = bench_quality.README_START, bench_quality.README_END
    readme.write_text(f"intro\n{start}\nold table\n{end}\nafter\n")
    assert bench_quality.update_readme("new table\n", readme)
    assert readme.read_text() == f"intro\n{start}\nnew table\n{end}\nafter\n"
    readme.write_text("no markers\n")
    assert not bench_quality.update_readme("new table\n", readme)
    assert readme.read_text() == "no markers\n"


def test_paper_and_reference_rows_differ_from_the_default_only_where_they_should() -> None:
    weak = bench_quality.method_params("demo", "weakseg", 1)
    full = bench_quality.method_params("demo", "fully_supervised", 1)
    assert weak["seed"] == 1 and weak["data"]["synthetic"]["seed"] == 1
    assert full["classifier"] == bench_quality.method_params("demo", "weakseg_whole_tile_classifier", 1)["classifier"]
    assert full["segmenter"]["targets"] == "truth"
    # The yardstick sits below the gate's step in the ladder: its head's cut by balanced accuracy, as measured.
    assert (full["segmenter"]["decision_rule"], weak["segmenter"]["decision_rule"]) == ("balanced_accuracy", "auto")
    assert {key: value for key, value in full["segmenter"].items() if key not in ("targets", "decision_rule")} == {
        key: value for key, value in weak["segmenter"].items() if key not in ("targets", "decision_rule")
    }


def test_a_resumed_benchmark_runs_only_what_is_missing(tmp_path: Path, monkeypatch: Any) -> None:
    """Finished runs (same params, same code) are skipped; a row whose params equal another's is not rerun."""
    monkeypatch.setattr(bench_quality, "sync_code", lambda project: "code-1")
    (tmp_path / "demo" / "project" / ".dvc").mkdir(parents=True)
    ran: list[str] = []

    def fake_run(project: Path, params: dict[str, Any]) -> dict[str, Any]:
        ran.append(params["segmenter"]["targets"])
        return {"stage_seconds": {"evaluate": 1.0}, "metrics": _evaluate_json(0.5, 0.4)}

    monkeypatch.setattr(bench_quality, "run_one", fake_run)
    runs: dict[str, Any] = {
        "demo/weakseg/0": {
            "params": bench_quality.method_params("demo", "weakseg", 0),
            "code": "code-1",
            "seconds": 9.0,
        }
    }
    bench_quality.run_dataset("demo", [0], runs, lambda: None, workspace=tmp_path, methods=["weakseg", "paper"])
    assert ran == ["pseudo"]  # paper only: weakseg was finished, the other rows were not asked for
    bench_quality.run_dataset("demo", [0], runs, lambda: None, workspace=tmp_path)
    rows = bench_quality.DATASET_METHODS["demo"]
    distinct = len({json.dumps(bench_quality.method_params("demo", row, 0), sort_keys=True) for row in rows})
    assert distinct == len(rows)
    assert ran[1] == "pseudo" and len(ran) == distinct - 1  # every run but the finished weakseg and paper
    assert runs["demo/weakseg/0"]["seconds"] == 9.0
    # A row whose params equal a finished row's is that run, not a second one.
    monkeypatch.setitem(bench_quality.DATASET_METHODS, "demo", (*rows, "weakseg_twin"))
    monkeypatch.setitem(bench_quality.ABLATIONS, "weakseg_twin", ("weakseg", {}))
    bench_quality.run_dataset("demo", [0], runs, lambda: None, workspace=tmp_path)
    assert runs["demo/weakseg_twin/0"]["same_as"] == "demo/weakseg/0" and len(ran) == distinct - 1
    monkeypatch.setitem(bench_quality.DATASET_METHODS, "demo", rows)
    monkeypatch.setattr(bench_quality, "sync_code", lambda project: "code-2")  # new code: everything again
    bench_quality.run_dataset("demo", [0], runs, lambda: None, workspace=tmp_path)
    assert len(ran) == 2 * distinct - 1


def test_imbalanced_variant_keeps_one_negative_per_ratio_positives_in_the_partitions_asked(
    tmp_path: Path,
) -> None:
    source = tmp_path / "source"
    (source / "images").mkdir(parents=True)
    rows = [(f"p{index}.png", "HGIN", "train") for index in range(20)]
    rows += [(f"n{index}.png", "Polyp", "train") for index in range(30)]
    rows += [(f"t{index}.png", "Polyp" if index % 2 else "HGIN", "test") for index in range(6)]
    for name, _, _ in rows:
        (source / "images" / name).write_bytes(name.encode())
    lines = ["Image Name,Majority Vote Label,Partition"] + [",".join(row) for row in rows]
    (source / "annotations.csv").write_text("\n".join(lines) + "\n")

    destination = bench_quality.make_imbalanced_variant(source, tmp_path / "variant", "HGIN", ratio=10, seed=0)
    kept = (destination / "annotations.csv").read_text().splitlines()[1:]
    train_negatives = [line for line in kept if line.endswith(",Polyp,train")]
    assert len(train_negatives) == 2  # 20 positives / 10
    assert sum(line.endswith(",HGIN,train") for line in kept) == 20
    assert sum(line.endswith(",test") for line in kept) == 6
    assert sorted(path.name for path in (destination / "images").iterdir()) == sorted(
        line.split(",")[0] for line in kept
    )
    assert (destination / "images" / "p3.png").read_bytes() == b"p3.png"  # a link to the source tile
    again = bench_quality.make_imbalanced_variant(source, tmp_path / "other", "HGIN", ratio=10, seed=0)
    assert (again / "annotations.csv").read_text() == (destination / "annotations.csv").read_text()

    rows += [(f"u{index}.png", "Polyp", "test") for index in range(20)]  # test: 3 positives, 23 negatives
    lines = ["Image Name,Majority Vote Label,Partition"] + [",".join(row) for row in rows]
    (source / "annotations.csv").write_text("\n".join(lines) + "\n")
    both = bench_quality.make_imbalanced_variant(
        source, tmp_path / "both", "HGIN", ratio=10, seed=0, partitions=("train", "test")
    )
    kept_both = (both / "annotations.csv").read_text().splitlines()[1:]
    assert [line for line in kept_both if line.endswith(",train")] == [
        line for line in kept if line.endswith(",train")
    ]  # the same train tiles as the train-only variant
    assert sum(line.endswith(",HGIN,test") for line in kept_both) == 3
    assert sum(line.endswith(",Polyp,test") for line in kept_both) == 1  # at least one, though 3 // 10 is 0


def test_ablation_rows_change_only_their_component() -> None:
    paper = bench_quality.method_params("demo", "paper", 0)
    without_crf = bench_quality.method_params("demo", "paper_without_crf", 0)
    assert without_crf["refine"]["crf"]["enabled"] is False
    without_crf["refine"]["crf"]["enabled"] = paper["refine"]["crf"]["enabled"]
    assert without_crf == paper
    # The crop classifier and its gate are the one step from the whole-tile row to the default before the
    # foreground's step, on both presets.
    for dataset in ("demo", "ebhi-hgin-polyp"):
        default = bench_quality.method_params(dataset, "weakseg_half_foreground", 0)
        whole = bench_quality.method_params(dataset, "weakseg_whole_tile_classifier", 0)
        assert default["classifier"]["crop_size"] is not None and whole["classifier"]["crop_size"] is None
        assert (default["evaluate"]["segmenter_gate"], whole["evaluate"]["segmenter_gate"]) == ("classifier", "none")
        for key in ("crop_size", "crops_per_tile", "epochs"):
            whole["classifier"][key] = default["classifier"][key]
        whole["evaluate"]["segmenter_gate"] = "classifier"
        assert whole == default
    weak = bench_quality.method_params("demo", "weakseg_whole_tile_classifier", 0)
    # The paper's chain and the yardstick keep the whole-tile classifier.
    assert paper["classifier"] == weak["classifier"]
    assert bench_quality.method_params("demo", "fully_supervised", 0)["classifier"] == weak["classifier"]
    losses = bench_quality.method_params("demo", "weakseg_with_tile_label_losses", 0)
    assert losses["segmenter"]["loss"]["multiple_instance"] > 0 and losses["segmenter"]["loss"]["size"] > 0
    assert {key: value for key, value in losses.items() if key != "segmenter"} == {
        key: value for key, value in weak.items() if key != "segmenter"
    }
    layer4 = bench_quality.method_params("demo", "weakseg_cam_layer4", 0)
    assert (weak["cam"]["target_layer"], layer4["cam"]["target_layer"], paper["cam"]["target_layer"]) == (
        "layer3",
        "layer4",
        "layer4",  # the paper's chain keeps its layer
    )
    without = bench_quality.method_params("demo", "weakseg_without_background_seeds", 0)
    assert (weak["refine"]["background_quantile"], without["refine"]["background_quantile"]) == ("auto", 0.0)
    layer4["cam"]["target_layer"] = "layer3"
    assert layer4 == without
    without["refine"]["background_quantile"] = "auto"
    assert without == weak
    for dataset in ("demo", "ebhi-hgin-polyp"):
        default = bench_quality.method_params(dataset, "weakseg", 2)
        half = bench_quality.method_params(dataset, "weakseg_half_foreground", 2)
        smaller = bench_quality.method_params(dataset, "weakseg_top_40_percent_foreground", 2)
        assert [row["refine"]["threshold_quantile"] for row in (default, half, smaller)] == ["auto", 0.5, 0.6]
        smaller["refine"]["threshold_quantile"] = 0.5
        assert smaller == half
        half["refine"]["threshold_quantile"] = "auto"
        # The gate's rule steps between them; the rows below it choose the cut by balanced accuracy alone.
        gate = bench_quality.method_params(dataset, "weakseg_balanced_accuracy_gate", 2)
        assert (default["classifier"]["decision_rule"], half["classifier"]["decision_rule"]) == (
            "auto",
            "balanced_accuracy",
        )
        assert half == gate
        assert half["segmenter"]["decision_rule"] == "balanced_accuracy"
        half["classifier"]["decision_rule"] = half["segmenter"]["decision_rule"] = "auto"
        # Hole filling is the top step: every row below it keeps the masks as they were measured.
        kept = bench_quality.method_params(dataset, "weakseg_without_hole_filling", 2)
        assert (default["evaluate"]["fill_holes"], kept["evaluate"]["fill_holes"], half["evaluate"]["fill_holes"]) == (
            True,
            False,
            False,
        )
        half["evaluate"]["fill_holes"] = kept["evaluate"]["fill_holes"] = True
        # The CAM is the top step: every row below it keeps the Grad-CAM it was measured with.
        grad_cam = bench_quality.method_params(dataset, "weakseg_grad_cam", 2)
        assert [row["cam"]["method"] for row in (default, grad_cam, kept, half)] == [
            "crop_evidence",
            "smoothgradcampp",
            "smoothgradcampp",
            "smoothgradcampp",
        ]
        assert half == grad_cam
        assert kept == grad_cam
        grad_cam["cam"]["method"] = "crop_evidence"
        # The gate of both models is the top step: every row below it keeps the classifier's gate.
        assert [row["evaluate"]["segmenter_gate"] for row in (default, grad_cam)] == [
            "classifier_and_head",
            "classifier",
        ]
        grad_cam["evaluate"]["segmenter_gate"] = "classifier_and_head"
        assert grad_cam == default
        # The rows below the foreground's step keep the top half they were measured with.
        for row in ("weakseg_whole_tile_classifier", "fully_supervised"):
            assert bench_quality.method_params(dataset, row, 2)["refine"]["threshold_quantile"] == 0.5
            assert bench_quality.method_params(dataset, row, 2)["evaluate"]["fill_holes"] is False
        assert bench_quality.method_params(dataset, "paper", 2)["evaluate"]["fill_holes"] is False
        yardstick = bench_quality.method_params(dataset, "fully_supervised", 2)
        assert yardstick["evaluate"]["segmenter_gate"] == "none"
        filled_yardstick = bench_quality.method_params(dataset, "fully_supervised_with_hole_filling", 2)
        assert filled_yardstick["evaluate"].pop("fill_holes") is True
        yardstick["evaluate"].pop("fill_holes")
        assert filled_yardstick == yardstick
    seeds = bench_quality.method_params("ebhi-hgin-polyp", "weakseg_with_background_seeds", 1)
    assert seeds["refine"]["background_quantile"] < seeds["refine"]["threshold_quantile"]
    whole = bench_quality.method_params("ebhi-hgin-polyp", "weakseg_whole_tile_classifier", 1)
    seeds["refine"] = whole["refine"]
    assert seeds == whole
