"""dvc.yaml stays true to the code: each stage depends on every project module it imports.

A stage whose code changes must re-run, so its ``deps`` must cover its stage module and every ``weakseg``
module that it imports, directly or through other modules (imports inside functions included).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_MD = ROOT.parent / "shared" / "PIPELINE.md"
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = ["download", "normalize", "train_classifier", "generate_cams", "refine_masks", "train_segmenter", "evaluate"]


def _module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _imported_project_files(start: Path) -> set[Path]:
    """Every project file reachable from ``start`` through ``weakseg`` imports."""
    seen: set[Path] = set()
    pending = [start]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                if name.split(".")[0] != "weakseg":
                    continue
                found = _module_file(name)
                if found is not None:
                    pending.append(found)
    return {path for path in seen if path.name != "__init__.py" or path.stat().st_size > 0}


def _covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


def _contract_stages() -> list[str]:
    """The stage names of PIPELINE.md's stage table, in its order (this module's list without the page)."""
    if not PIPELINE_MD.is_file():
        return STAGES
    table = PIPELINE_MD.read_text().split("## Stages", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE)


def _outputs(stage: dict) -> list[str]:
    entries: list[str] = []
    for kind in ("outs", "metrics", "plots"):
        for entry in stage.get(kind) or []:
            entries.extend(entry.keys() if isinstance(entry, dict) else [entry])
    return entries


def test_the_pipeline_has_the_contract_stages_in_order() -> None:
    assert list(PIPELINE["stages"]) == _contract_stages() == STAGES


def test_every_stage_module_is_a_stage_that_runs_it() -> None:
    modules = sorted(path.stem for path in (ROOT / "stages").glob("*.py") if path.stem != "__init__")
    assert sorted(PIPELINE["stages"]) == modules
    for name, stage in PIPELINE["stages"].items():
        assert stage["cmd"].split() == ["python", "-m", f"stages.{name}"], name


def test_each_stage_reads_only_data_written_by_a_stage_before_it() -> None:
    """Listed in the order the data flows: every data or model dependency is an output of an earlier stage."""
    written: list[str] = []
    for name, stage in PIPELINE["stages"].items():
        for dep in stage.get("deps") or []:
            if dep.startswith(("data/", "models/")):
                assert any(Path(dep) == Path(out) or Path(out) in Path(dep).parents for out in written), (name, dep)
        written += _outputs(stage)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_depends_on_every_module_it_imports(stage: str) -> None:
    deps = [dep for dep in PIPELINE["stages"][stage]["deps"] if not dep.startswith(("data/", "models/"))]
    imported = _imported_project_files(ROOT / "stages" / f"{stage}.py")
    missing = sorted(str(path.relative_to(ROOT)) for path in imported if not _covered(path, deps))
    assert not missing, f"dvc.yaml stage {stage!r} imports but does not depend on: {missing}"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_declares_only_params_sections_that_exist(stage: str) -> None:
    from weakseg.params import Params

    for entry in PIPELINE["stages"][stage].get("params", []):
        section = Params()
        for part in entry.split("."):
            assert hasattr(section, part), f"{stage}: params entry {entry!r} is not in the schema"
            section = getattr(section, part)
