"""Where a process stands in a PyTorch process group: device choice, joining and leaving the group.

A process started by ``torchrun`` (``torch.distributed.run``) finds its rank in the launcher's environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) and joins the group; any other process runs alone, in a
one-process :class:`DistributedContext`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as torch_distributed


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the process group (a single process when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """Whether a process group with more than one process is in use."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs (rank 0)."""
        return self.rank == 0


def select_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is available; use 'auto' or 'cpu'")
    return torch.device(name)


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` / ``torch.distributed.run``."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` means NCCL on GPUs and gloo on CPU."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def init_distributed(backend: str = "auto", device_name: str = "auto") -> DistributedContext:
    """Joins the process group when launched by ``torchrun``; otherwise returns a single-process context.

    Args:
        backend: ``auto``, ``gloo`` or ``nccl``.
        device_name: ``auto``, ``cpu`` or ``cuda`` (each process takes the GPU of its local rank).

    Raises:
        RuntimeError: if ``cuda`` is asked for on a machine without a GPU.
    """
    device = select_device(device_name)
    if not launched_by_torchrun():
        return DistributedContext(device=device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"process {local_rank} of this node has no GPU of its own ({torch.cuda.device_count()} visible); "
                f"start at most one process per GPU (distributed.processes_per_node, torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not torch_distributed.is_initialized():
        torch_distributed.init_process_group(backend=resolve_backend(backend, device), rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(context: DistributedContext) -> None:
    """Waits for every rank, then leaves the process group."""
    if torch_distributed.is_available() and torch_distributed.is_initialized():
        if context.enabled:
            torch_distributed.barrier()
        torch_distributed.destroy_process_group()


@contextlib.contextmanager
def leaving_process_group(context: DistributedContext) -> Iterator[DistributedContext]:
    """Leaves the process group (if one was joined) when the ``with`` block ends.

    On success every rank waits for the others first (:func:`shutdown`). On an error the group is
    destroyed without that barrier: the other ranks may never reach it (the launcher stops them once this
    process exits).
    """
    try:
        yield context
    except BaseException:
        if torch_distributed.is_available() and torch_distributed.is_initialized():
            torch_distributed.destroy_process_group()
        raise
    shutdown(context)
