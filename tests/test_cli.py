"""The installed command lines: what the README tells a new user to type exists after `make venv`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def _readme_predict_section() -> str:
    text = (PROJECT_ROOT / "README.md").read_text()
    start = text.index("## Predicting new tiles")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _installed_command(name: str) -> str:
    """The console script in the interpreter's own bin folder (the virtual environment), else on PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(name, path=search)
    assert found is not None, f"{name} is not installed next to {sys.executable}; run `make venv`"
    return found


def test_weakseg_predict_runs_by_the_name_the_readme_uses() -> None:
    command_lines = [
        line.strip() for line in _readme_predict_section().splitlines() if line.strip().startswith("weakseg-")
    ]
    assert command_lines, "README's 'Predicting new tiles' shows no weakseg-predict command"
    program = command_lines[0].split()[0]
    assert program == "weakseg-predict"
    completed = subprocess.run(
        [_installed_command(program), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    options = set(OPTION.findall(completed.stdout))
    assert {"--input", "--output"} <= options
    readme_options = set(OPTION.findall(command_lines[0].split("#")[0]))
    assert readme_options == {"--input", "--output"}
    # Every option the README's section mentions (`--overlap`, `--workers`, ...) is one the command takes.
    assert set(OPTION.findall(_readme_predict_section())) <= options
