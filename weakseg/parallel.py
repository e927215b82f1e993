"""One way to run independent per-item work on every core: an ordered process-pool map with a progress bar.

Results come back in the order of the items, whatever the worker count, so a stage's outputs do not depend
on how many processes made them. Call :func:`map_in_processes` before opening an MLflow run or anything else
that starts threads: the pool forks this process where the platform allows it.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
Result = TypeVar("Result")

# Largest number of items sent to a worker at once: chunks amortize inter-process traffic, and this cap keeps
# the load balanced and the progress bar moving.
MAX_CHUNK = 32
# Aim for at least this many chunks per worker.
CHUNKS_PER_WORKER = 8


def resolve_workers(requested: int) -> int:
    """A ``workers`` parameter as a process count: 0 means every core this process may use.

    Args:
        requested: the parameter (0, or a positive count).

    Returns:
        ``requested`` when positive, else the number of cores available to this process (at least 1).
    """
    if requested > 0:
        return requested
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


def chunk_size(items: int, workers: int) -> int:
    """How many items each task of the pool carries, for ``items`` items on ``workers`` processes."""
    return max(1, min(MAX_CHUNK, items // (workers * CHUNKS_PER_WORKER)))


def _pool_context() -> multiprocessing.context.BaseContext:
    """``fork`` where the platform has it (workers start in milliseconds, not seconds), else ``spawn``."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _start_worker() -> None:
    # One BLAS thread per process: the pool already fills the cores.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def map_in_processes(
    function: Callable[[Item], Result],
    items: Sequence[Item],
    workers: int,
    description: str,
    unit: str = "tile",
    progress: bool = True,
) -> list[Result]:
    """``[function(item) for item in items]`` on a process pool, with a progress bar; results in ``items`` order.

    Args:
        function: a picklable callable (a module-level function, or a :func:`functools.partial` of one)
            whose result is picklable.
        items: the work, one picklable item each.
        workers: process count; 0 uses every core, and 1 (or a single item) runs in this process.
        description: the progress bar's label.
        unit: what one item is, for the progress bar.
        progress: False hides the progress bar.

    Returns:
        One result per item, in the order of ``items``.
    """
    workers = min(resolve_workers(workers), len(items))
    if workers <= 1:
        return [function(item) for item in tqdm(items, desc=description, unit=unit, leave=False, disable=not progress)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(), initializer=_start_worker) as pool:
        # map() submits every chunk, so the workers are forked before tqdm starts its monitor thread.
        ordered = pool.map(function, items, chunksize=chunk_size(len(items), workers))
        return list(tqdm(ordered, total=len(items), desc=description, unit=unit, leave=False, disable=not progress))
