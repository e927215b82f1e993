"""Tests of the params.yaml schema (weakseg/params/) and of how a stage reacts to bad params."""

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
        ("refine.threshold_quantile", 1.5, r"refine\.threshold_quantile\b.*less than or equal to 1"),
        ("refine.threshold_quantile", "top", r"refine\.threshold_quantile\b.*'auto'"),
        ("refine.ignore_band_width", 1.5, r"refine\.ignore_band_width: .*less than or equal to 1"),
        ("refine.threshold_quantile", -0.1, r"refine\.threshold_quantile"),
        ("data.source", "kaggle", r"data\.source: .*'synthetic', 'mhist' or 'folder'"),
        ("data.synthetic.label_noise", 0.5, r"data\.synthetic\.label_noise"),
        ("data.mhist.check_counts", "yes", r"data\.mhist\.check_counts"),
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


# ------------------------------------------------------------------------------- unfreeze schedule
def _classifier(epochs: int, frozen_epochs: int, full_epoch: int, enabled: bool = True) -> dict[str, Any]:
    raw = _project_params()
    raw["classifier"]["epochs"] = epochs
    raw["classifier"]["unfreeze"] = {"enabled": enabled, "frozen_epochs": frozen_epochs, "full_epoch": full_epoch}
    return raw


@pytest.mark.parametrize("full_epoch", [25, 30])
def test_full_unfreeze_at_or_after_the_last_epoch_is_refused(full_epoch: int) -> None:
    """Epochs run 0..24: a full_epoch of 25 would leave layer1 and the stem frozen for the whole run."""
    with pytest.raises(ParamsError, match=r"classifier\.unfreeze\.full_epoch: must be < classifier\.epochs \(25\)"):
        parse_params(_classifier(25, 5, full_epoch), "params.yaml")
    parse_params(_classifier(25, 5, full_epoch, enabled=False))  # unused values are not checked
    parse_params(_classifier(25, 5, 24))


def test_frozen_epochs_after_full_epoch_is_refused_naming_the_key() -> None:
    with pytest.raises(ParamsError, match=r"classifier\.unfreeze\.full_epoch: must be >= frozen_epochs \(8\)"):
        parse_params(_classifier(25, 8, 7), "params.yaml")
    parse_params(_classifier(25, 8, 7, enabled=False))


def test_crop_evidence_without_a_crop_size_is_refused_naming_the_key() -> None:
    raw: dict[str, dict[str, Any]] = {"cam": {"method": "crop_evidence"}, "classifier": {"crop_size": None}}
    with pytest.raises(ParamsError, match=r"cam.evidence_crop_size: cam.method crop_evidence needs"):
        parse_params(raw, "params.yaml")
    assert (
        parse_params({"cam": {"method": "crop_evidence"}, "classifier": {"crop_size": 64}}).cam.evidence_crop_size
        is None
    )
    raw["cam"]["evidence_crop_size"] = 32
    assert parse_params(raw).cam.evidence_crop_size == 32


def test_several_crops_per_tile_without_a_crop_size_are_refused_naming_the_key() -> None:
    raw = _project_params()
    raw["classifier"].update(crop_size=None, crops_per_tile=4)
    with pytest.raises(ParamsError, match=r"classifier\.crops_per_tile: needs classifier\.crop_size"):
        parse_params(raw, "params.yaml")
    raw["classifier"]["crop_size"] = 64
    assert parse_params(raw).classifier.crops_per_tile == 4
    raw["classifier"]["crop_size"] = 8
    with pytest.raises(ParamsError, match=r"classifier\.crop_size"):
        parse_params(raw, "params.yaml")


def test_size_bounds_out_of_order_are_refused_naming_the_key() -> None:
    raw = _project_params()
    raw["segmenter"]["loss"] = {**raw["segmenter"].get("loss", {}), "size_lower": 0.8, "size_upper": 0.5}
    with pytest.raises(ParamsError, match=r"segmenter\.loss\.size_lower: must be <= segmenter\.loss\.size_upper"):
        parse_params(raw, "params.yaml")


def test_paper_preset_trains_every_group_well_before_the_end() -> None:
    """With the paper preset's schedule the stem and layer1 train in the last epochs, not never."""
    from weakseg.training.unfreezing import ALL_GROUPS, STEM_GROUP, trainable_groups

    classifier = load_params(PROJECT_ROOT / "presets" / "paper-mhist.yaml").classifier
    assert classifier.unfreeze.enabled
    schedule = [trainable_groups(epoch, classifier.unfreeze) for epoch in range(classifier.epochs)]
    assert schedule[0] == {"fc"}  # progressive: the pretrained backbone starts frozen
    assert schedule[-1] == set(ALL_GROUPS)
    assert sum(STEM_GROUP in groups for groups in schedule) >= 5


# ---------------------------------------------------------------------------- declared keys only
def test_a_declared_key_does_not_open_its_section() -> None:
    """Declaring refine.threshold_quantile gives that key, not refine.crf (DVC would not track it)."""
    view = StageParams(load_params(PROJECT_ROOT / "params.yaml"), ["refine.threshold_quantile", "evaluate"], "evaluate")
    assert view.refine.threshold_quantile == "auto"
    assert view.evaluate.threshold == 0.5  # a whole section gives everything under it
    with pytest.raises(ParamsError, match=r"stage 'evaluate' reads params 'refine\.crf' but dvc\.yaml does not"):
        _ = view.refine.crf
    with pytest.raises(ParamsError, match="refine.restrict_to_tissue"):
        _ = view.refine.restrict_to_tissue
    assert view.to_flat_dict() == {"refine.threshold_quantile": "auto"} | {
        f"evaluate.{key}": value for key, value in view.evaluate.model_dump().items()
    }


def test_undeclared_nested_key_read_names_the_stage(tmp_path: Path) -> None:
    """A stage declaring data.positive_label cannot read data.source through the view dvc.yaml gives it."""
    view = load_stage_params("normalize", PROJECT_ROOT / "params.yaml", PROJECT_ROOT / "dvc.yaml")
    assert view.data.positive_label == "SSA"
    with pytest.raises(ParamsError, match=r"stage 'normalize' reads params 'data\.source'"):
        _ = view.data.source
    with pytest.raises(ParamsError, match=r"stage 'normalize' reads params 'data\.synthetic'"):
        _ = view.data.synthetic.seed
    assert not any(key.startswith("data.") and key != "data.positive_label" for key in view.to_flat_dict())
    with pytest.raises(AttributeError, match="read-only"):
        view.data.positive_label = "HP"


def test_every_params_read_in_the_stages_is_declared_in_dvc_yaml() -> None:
    """Each literal ``params.a.b`` in stages/<stage>.py resolves through that stage's declared view."""
    import re

    pattern = re.compile(r"(?<![\w.])params((?:\.[a-z_]+)+)")
    for script in sorted((PROJECT_ROOT / "stages").glob("*.py")):
        if script.stem == "__init__":
            continue
        view = load_stage_params(script.stem, PROJECT_ROOT / "params.yaml", PROJECT_ROOT / "dvc.yaml")
        for match in pattern.finditer(script.read_text()):
            names = match.group(1).strip(".").split(".")
            if names[0] in {"to_flat_dict", "declared"}:
                continue
            value: Any = view
            for name in names:
                value = getattr(value, name)  # ParamsError names the stage and the undeclared key


def test_background_quantile_above_threshold_quantile_is_refused_naming_both_keys() -> None:
    raw = _with("refine.threshold_quantile", 0.5)
    raw["refine"]["background_quantile"] = 0.6
    with pytest.raises(
        ParamsError, match=r"refine\.background_quantile: must be <= refine\.threshold_quantile \(0\.5\)"
    ):
        parse_params(raw, "params.yaml")
    raw["refine"]["background_quantile"] = 0.5
    assert parse_params(raw).refine.background_quantile == 0.5
    from weakseg.params import RefineParams

    assert RefineParams().background_quantile is None  # the schema's default is the paper's chain


def test_auto_threshold_quantile_without_background_quantile_is_refused() -> None:
    """threshold_quantile: auto sits above the background seeds, so the two-label chain (null) cannot use it."""
    raw = _with("refine.threshold_quantile", "auto")
    raw["refine"]["background_quantile"] = None
    with pytest.raises(ParamsError, match=r"refine\.threshold_quantile: auto places .*refine\.background_quantile"):
        parse_params(raw, "params.yaml")
    raw["refine"]["background_quantile"] = 0.3
    assert parse_params(raw).refine.threshold_quantile == "auto"
