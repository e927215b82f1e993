"""Tests of the params.yaml schema (weakseg/params.py) and of how a stage reacts to bad params."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from weakseg.params import ParamsError, StageParams, declared_params, load_params, load_stage_params, parse_params
from weakseg.stage import EXIT_USER_ERROR, run_stage

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _project_params() -> dict[str, Any]:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def _with(path: str, value: Any) -> dict[str, Any]:
    raw = _project_params()
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value
    return raw


def test_project_params_and_paper_preset_are_valid() -> None:
    params = load_params(PROJECT_ROOT / "params.yaml")
    assert params.data.source == "synthetic" and params.data.synthetic.num_tiles == 300
    for preset in sorted((PROJECT_ROOT / "presets").glob("*.yaml")):
        load_params(preset)


def test_defaults_fill_missing_sections() -> None:
    assert parse_params({}).refine.threshold_quantile == 0.5
    assert parse_params(None).data.positive_label == "SSA"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("data.synthetic.num_tile", 3, r"data\.synthetic\.num_tile: unknown key"),
        ("data.synthetic.num_tiles", "many", r"data\.synthetic\.num_tiles: .*integer.*'many'"),
        ("data.synthetic.num_tiles", 2.5, r"data\.synthetic\.num_tiles"),
        ("refine.opening_kernel", -1, r"refine\.opening_kernel: .*greater than or equal to 0"),
        ("refine.threshold_quantile", 1.5, r"refine\.threshold_quantile: .*less than or equal to 1"),
        ("refine.threshold_quantile", -0.1, r"refine\.threshold_quantile"),
        ("data.source", "kaggle", r"data\.source: .*'synthetic', 'mhist' or 'folder'"),
        ("data.synthetic.label_noise", 0.5, r"data\.synthetic\.label_noise"),
        ("data.mhist.check_counts", "yes", r"data\.mhist\.check_counts"),
        ("classifier.unfreeze.full_epoch", 1, r"full_epoch \(1\) must be >= frozen_epochs"),
        ("data.positive_label", "", r"data\.positive_label"),
    ],
)
def test_bad_values_are_named(path: str, value: Any, message: str) -> None:
    with pytest.raises(ParamsError, match=message) as raised:
        parse_params(_with(path, value), "params.yaml")
    assert str(raised.value).startswith("params.yaml: invalid parameters")


def test_unknown_top_level_section() -> None:
    raw = _project_params() | {"trainer": {"epochs": 3}}
    with pytest.raises(ParamsError, match="trainer: unknown key"):
        parse_params(raw)


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ParamsError, match="expected a mapping"):
        parse_params([1, 2])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="parameters file not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_stage_sees_only_declared_sections() -> None:
    view = load_stage_params("download", PROJECT_ROOT / "params.yaml", PROJECT_ROOT / "dvc.yaml")
    assert isinstance(view, StageParams)
    assert view.declared == {"data"}
    assert view.data.source == "synthetic"
    with pytest.raises(ParamsError, match="stage 'download' reads params 'refine'"):
        _ = view.refine
    assert "data.synthetic.num_tiles" in view.to_flat_dict()
    assert "data.positive_label" in declared_params("normalize", PROJECT_ROOT / "dvc.yaml")
    with pytest.raises(ParamsError, match="no stage named 'nope'"):
        declared_params("nope", PROJECT_ROOT / "dvc.yaml")


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        ("refine.opening_kernel", -3, "refine.opening_kernel"),  # an undeclared section still stops the stage
        ("data.synthetic.tile_size", 8, "data.synthetic.tile_size"),
        ("data.synthetic.positive_fraction", 1.2, "data.synthetic.positive_fraction"),
    ],
)
def test_stage_with_bad_params_writes_nothing_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], path: str, value: Any, key: str
) -> None:
    from stages.download import run

    monkeypatch.chdir(tmp_path)
    shutil.copy(PROJECT_ROOT / "dvc.yaml", "dvc.yaml")
    Path("params.yaml").write_text(yaml.safe_dump(_with(path, value)))
    assert run_stage("download", run, argv=[]) == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert key in error and "Traceback" not in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dvc.yaml", "params.yaml"]
