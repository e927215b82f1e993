"""PyTorch distributed training helpers: launching, process groups, sharding and reductions.

A training stage with ``distributed.processes_per_node > 1`` re-launches itself through PyTorch's elastic
launcher (``python -m torch.distributed.run``, the engine behind ``torchrun``). For several machines the
user starts ``torchrun`` on each node with the standard rendezvous options; the stage then sees the
launcher's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) and does not re-launch.

Only rank 0 writes checkpoints, metrics and MLflow records; every rank computes the same global numbers
because validation counts and predictions are reduced across ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_distributed

from weakseg.training.common import select_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the process group (a single process when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """Whether a process group is in use."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs (rank 0)."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` / ``torch.distributed.run``."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_command(module: str, processes_per_node: int, arguments: Sequence[str] = ()) -> list[str]:
    """The command that runs ``python -m module`` in ``processes_per_node`` processes on this machine."""
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


def relaunch(module: str, processes_per_node: int, arguments: Sequence[str] = ()) -> int:
    """Runs the stage module under the elastic launcher and returns its exit status."""
    environment = dict(os.environ)
    # Each process gets an equal share of the cores instead of all of them, which would oversubscribe.
    cores = os.cpu_count() or 1
    environment.setdefault("OMP_NUM_THREADS", str(max(1, cores // processes_per_node)))
    return subprocess.run(relaunch_command(module, processes_per_node, arguments), env=environment, check=False).returncode


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` means NCCL on GPUs and gloo on CPU."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def init_distributed(backend: str = "auto", device_name: str = "auto") -> DistributedContext:
    """Joins the process group when launched by ``torchrun``; otherwise returns a single-process context."""
    device = select_device(device_name)
    if not launched_by_torchrun():
        return DistributedContext(device=device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not torch_distributed.is_initialized():
        torch_distributed.init_process_group(backend=resolve_backend(backend, device), rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(context: DistributedContext) -> None:
    """Leaves the process group."""
    if context.enabled and torch_distributed.is_initialized():
        torch_distributed.barrier()
        torch_distributed.destroy_process_group()


def shard(items: Sequence[T], context: DistributedContext) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item from ``rank`` (order preserved).

    Shares differ in length by at most one; callers that need equal step counts (DDP) pad with
    :func:`pad_to_multiple` first.
    """
    return list(items[context.rank :: context.world_size])


def pad_to_multiple(items: Sequence[T], multiple: int) -> list[T]:
    """Repeats items from the start so that the length is a multiple of ``multiple`` (as DistributedSampler)."""
    items = list(items)
    if multiple <= 1 or not items:
        return items
    remainder = (-len(items)) % multiple
    return items + [items[index % len(items)] for index in range(remainder)]


def all_reduce_sum(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sums a tensor over ranks (a copy; the input is unchanged)."""
    result = values.detach().clone()
    if context.enabled:
        device = context.device if resolve_backend("auto", context.device) == "nccl" else torch.device("cpu")
        moved = result.to(device)
        torch_distributed.all_reduce(moved, op=torch_distributed.ReduceOp.SUM)
        result = moved.to(values.device)
    return result


def gather_objects(value: Any, context: DistributedContext) -> list[Any]:
    """Collects one picklable value from every rank, in rank order (``[value]`` when not distributed)."""
    if not context.enabled:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    torch_distributed.all_gather_object(gathered, value)
    return gathered


def barrier(context: DistributedContext) -> None:
    """Waits for every rank."""
    if context.enabled:
        torch_distributed.barrier()
