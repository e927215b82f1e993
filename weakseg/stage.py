"""What every ``stages/<stage>.py`` does around its body: validate params, report user errors plainly.

A stage module is::

    def run(params: StageParams) -> None: ...
    if __name__ == "__main__":
        raise SystemExit(run_stage("normalize", run))
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from weakseg.errors import UserInputError
from weakseg.io import remove_stale_temporaries
from weakseg.params import StageParams, load_stage_params

EXIT_USER_ERROR = 2


def run_stage(
    stage: str,
    body: Callable[[StageParams], None],
    argv: Sequence[str] | None = None,
) -> int:
    """Loads and validates the stage's declared params, runs ``body``, and turns user errors into one line.

    Args:
        stage: the stage's name in ``dvc.yaml``.
        body: the stage's work.
        argv: command-line arguments (``--params``, ``--dvc-yaml``); ``sys.argv[1:]`` by default.

    Returns:
        The process exit status: 0 on success, 2 on a user error (message on stderr).
    """
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"The {stage} stage.")
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("--dvc-yaml", default="dvc.yaml", help="pipeline file declaring the stage's params")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage} %(levelname)s %(message)s")
    started = time.perf_counter()
    try:
        params = load_stage_params(stage, arguments.params, arguments.dvc_yaml)
        _remove_leftovers_of_killed_runs(stage, arguments.dvc_yaml)
        body(params)
    except UserInputError as error:
        print(f"weakseg {stage}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    logging.getLogger(__name__).info("finished in %.1f s", time.perf_counter() - started)
    return 0


def _declared_outputs(stage: str, dvc_yaml: str | Path) -> list[Path]:
    document = yaml.safe_load(Path(dvc_yaml).read_text()) or {}
    entries: list[str] = []
    for kind in ("outs", "metrics", "plots"):
        for entry in document.get("stages", {}).get(stage, {}).get(kind, []) or []:
            entries.extend(entry.keys() if isinstance(entry, dict) else [entry])
    return [Path(entry) for entry in entries]


def _remove_leftovers_of_killed_runs(stage: str, dvc_yaml: str | Path) -> None:
    """A killed run can leave temporary siblings of its outputs (atomic writes never finished); drop them."""
    for output in _declared_outputs(stage, dvc_yaml):
        remove_stale_temporaries(output.parent)
        if output.is_dir():
            remove_stale_temporaries(output)


def run_relaunchable_stage(stage: str, run: Callable[..., None], argv: Sequence[str] | None = None) -> int:
    """:func:`run_stage` for a stage that may re-launch itself: ``run(params, stage_arguments=argv)``.

    The arguments (``sys.argv[1:]`` by default) reach ``run`` too, so a re-launched process reads the same
    params file.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    return run_stage(stage, functools.partial(run, stage_arguments=arguments), argv=arguments)
