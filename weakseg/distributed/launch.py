"""Starting a stage in several processes, and the frame every such stage runs its work in.

A training stage with ``distributed.processes_per_node > 1`` re-launches itself through PyTorch's elastic
launcher (``python -m torch.distributed.run``, the engine behind ``torchrun``). For several machines the
user starts ``torchrun`` on each node with the standard rendezvous options; the stage then sees the
launcher's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) and does not re-launch. The inference
stages (generate_cams, evaluate) never re-launch themselves: they run in several processes only when
started by ``torchrun``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, overload

from weakseg.distributed.process_group import (
    DistributedContext,
    init_distributed,
    launched_by_torchrun,
    leaving_process_group,
)
from weakseg.distributed.sampling import per_process_batch_size
from weakseg.errors import UserInputError


class DistributedLaunchError(UserInputError):
    """Raised when the processes of a re-launched distributed run fail (their messages come first)."""


class DeviceError(UserInputError):
    """Raised when the requested device is not available."""


def relaunch_command(module: str, processes_per_node: int, arguments: Sequence[str] = ()) -> list[str]:
    """The command that runs ``python -m module`` in ``processes_per_node`` processes on this machine.

    ``--standalone`` starts a private rendezvous on a free local port, so two runs on one machine do not
    collide.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes_per_node}",
        "-m",
        module,
        *arguments,
    ]


def _module_search_root(module: str) -> Path | None:
    """The folder that holds ``module``'s top-level package (what must be on ``sys.path`` to import it)."""
    spec = importlib.util.find_spec(module.split(".")[0])
    if spec is None:
        return None
    if spec.submodule_search_locations:  # a package (regular or namespace): the folder above it
        return Path(next(iter(spec.submodule_search_locations))).parent
    return Path(spec.origin).parent if spec.origin else None


def relaunch(module: str, processes_per_node: int, arguments: Sequence[str] = ()) -> int:
    """Runs the stage module under the elastic launcher and returns its exit status.

    Args:
        module: the module to run (``stages.train_classifier``).
        processes_per_node: how many processes to start on this machine.
        arguments: the stage's command-line arguments (``--params``, ``--dvc-yaml``).

    Returns:
        The launcher's exit status (0 when every process succeeded).
    """
    environment = dict(os.environ)
    # Each process gets an equal share of the cores instead of all of them, which would oversubscribe.
    cores = os.cpu_count() or 1
    environment.setdefault("OMP_NUM_THREADS", str(max(1, cores // processes_per_node)))
    # The children import the stage by module name; the working folder may not be the one holding it.
    search_root = _module_search_root(module)
    if search_root is not None:
        existing = environment.get("PYTHONPATH")
        environment["PYTHONPATH"] = os.pathsep.join([str(search_root), *([existing] if existing else [])])
    command = relaunch_command(module, processes_per_node, arguments)
    return subprocess.run(command, env=environment, check=False).returncode


def relaunch_or_fail(
    module: str, processes_per_node: int, arguments: Sequence[str] = (), batch_size: tuple[str, int] | None = None
) -> None:
    """:func:`relaunch`, turning a failed run into a :class:`DistributedLaunchError`.

    Args:
        module: the stage module.
        processes_per_node: how many processes to start on this machine.
        arguments: the stage's command-line arguments.
        batch_size: ``(parameter name, value)`` of the global batch, checked before anything starts.

    Raises:
        DistributedBatchError: if the batch cannot be split evenly over the processes.
        DistributedLaunchError: if any process failed (its own message is above, on stderr).
    """
    if batch_size is not None:
        per_process_batch_size(batch_size[1], processes_per_node, batch_size[0])
    status = relaunch(module, processes_per_node, arguments)
    if status != 0:
        raise DistributedLaunchError(
            f"the {processes_per_node} processes of {module} (distributed.processes_per_node) exited with "
            f"status {status}; the first error above says why"
        )


@dataclass(frozen=True)
class StageRelaunch:
    """How a stage starts its own processes when it is not run by ``torchrun`` (the training stages).

    Attributes:
        module: the stage module to re-launch (``stages.train_classifier``).
        processes_per_node: ``<section>.distributed.processes_per_node``.
        batch_size: ``<section>.batch_size``, the global batch the processes must divide.
        arguments: the command-line arguments a re-launch passes on.
    """

    module: str
    processes_per_node: int
    batch_size: int
    arguments: Sequence[str] = ()


@overload
def run_distributed_stage(
    section: str,
    device: str,
    work: Callable[[DistributedContext], None],
    *,
    relaunch: StageRelaunch,
    backend: str = ...,
    device_error: type[UserInputError] | None = ...,
) -> None: ...


@overload
def run_distributed_stage(
    section: str,
    device: str,
    work: Callable[[DistributedContext | None], None],
    *,
    relaunch: None = ...,
    backend: str = ...,
    device_error: type[UserInputError] | None = ...,
) -> None: ...


def run_distributed_stage(
    section: str,
    device: str,
    work: Callable[[DistributedContext], None] | Callable[[DistributedContext | None], None],
    *,
    relaunch: StageRelaunch | None = None,
    backend: str = "auto",
    device_error: type[UserInputError] | None = DeviceError,
) -> None:
    """What every stage that can run in several processes does around its work: launch, join, work, leave.

    Outside ``torchrun``, a stage given ``relaunch`` (a training stage) re-launches its module under the
    elastic launcher when ``relaunch.processes_per_node > 1``, and otherwise works in a one-process
    context; a stage without ``relaunch`` (one that only ``torchrun`` starts in several processes) calls
    ``work(None)`` and chooses its device itself. Otherwise this process joins the group, leaves progress
    messages to rank 0, and calls ``work(context)``, leaving the group when the work ends.

    Args:
        section: the stage's params section, for messages (``classifier``, ``evaluate``).
        device: ``<section>.device``.
        work: the stage's work, given this process's context.
        relaunch: how the stage starts its own processes; None for a stage that never re-launches itself.
        backend: ``<section>.distributed.backend``.
        device_error: what an unavailable ``device`` raises (its message names ``<section>.device``);
            None lets ``init_distributed``'s ``RuntimeError`` through.

    Raises:
        DistributedBatchError: before a re-launch, if the processes cannot split ``relaunch.batch_size``.
        DistributedLaunchError: if a re-launched process failed.
        UserInputError: ``device_error``, if ``device`` is not available.
    """
    if relaunch is None:
        if not launched_by_torchrun():
            work(None)  # type: ignore[arg-type]  # the overloads pair relaunch=None with such work
            return
    elif relaunch.processes_per_node > 1 and not launched_by_torchrun():
        relaunch_or_fail(
            relaunch.module,
            relaunch.processes_per_node,
            relaunch.arguments,
            batch_size=(f"{section}.batch_size", relaunch.batch_size),
        )
        return
    try:
        context = init_distributed(backend, device)
    except RuntimeError as error:
        if device_error is None:
            raise
        raise device_error(f"{section}.device: {error}") from None
    if not context.is_main:
        # One process reports progress; the others would repeat every line.
        logging.getLogger().setLevel(logging.WARNING)
    with leaving_process_group(context):
        work(context)


class _ProcessSettings(Protocol):
    @property
    def processes_per_node(self) -> int: ...

    @property
    def backend(self) -> str: ...


class TrainingSectionSettings(Protocol):
    """What :func:`run_training_stage` reads of a training section (``classifier`` or ``segmenter``)."""

    @property
    def device(self) -> str: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def distributed(self) -> _ProcessSettings: ...


def run_training_stage(
    stage: str,
    section: str,
    settings: TrainingSectionSettings,
    work: Callable[[DistributedContext], None],
    stage_arguments: Sequence[str] = (),
) -> None:
    """A training stage's frame: :func:`run_distributed_stage` re-launching ``stages.<stage>`` when asked.

    With ``<section>.distributed.processes_per_node > 1`` the stage re-launches itself under PyTorch's
    elastic launcher; under ``torchrun`` (that re-launch, or a user's multi-node command) every process
    trains its share of each global batch with ``DistributedDataParallel``, and only rank 0 writes files
    and the MLflow run.

    Args:
        stage: the stage's name (``train_classifier``), whose module ``stages.<stage>`` a re-launch runs.
        section: its params section (``classifier``), for messages.
        settings: that section.
        work: the stage's work in one process.
        stage_arguments: the command-line arguments a re-launch passes on.
    """
    run_distributed_stage(
        section,
        settings.device,
        work,
        relaunch=StageRelaunch(
            f"stages.{stage}", settings.distributed.processes_per_node, settings.batch_size, stage_arguments
        ),
        backend=settings.distributed.backend,
    )
