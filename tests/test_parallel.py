"""Tests of weakseg.parallel: the ordered process-pool map every stage uses to fill the cores."""

from __future__ import annotations

import os

import pytest

from weakseg.errors import UserInputError
from weakseg.parallel import chunk_size, map_in_processes, resolve_workers


def square_and_process(value: int) -> tuple[int, int]:
    """The item's square, and the process that computed it."""
    return value * value, os.getpid()


def blas_threads(_: int) -> list[int]:
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def refuse_three(value: int) -> int:
    if value == 3:
        raise UserInputError(f"item {value} is bad")
    return value


def test_zero_workers_means_every_available_core() -> None:
    assert resolve_workers(3) == 3
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert cores is not None
    assert resolve_workers(0) == cores >= 1


def test_chunks_keep_several_per_worker_and_at_most_32() -> None:
    assert chunk_size(10, 2) == 1
    assert chunk_size(160, 2) == 10
    assert chunk_size(100_000, 2) == 32


def test_one_worker_runs_in_this_process_in_order() -> None:
    results = map_in_processes(square_and_process, [3, 1, 2], workers=1, description="test", progress=False)
    assert results == [(9, os.getpid()), (1, os.getpid()), (4, os.getpid())]
    assert map_in_processes(square_and_process, [], workers=0, description="test", progress=False) == []


def test_pool_results_come_back_in_item_order_from_other_processes() -> None:
    items = list(range(40, 0, -1))
    results = map_in_processes(square_and_process, items, workers=2, description="test", progress=False)
    assert [square for square, _ in results] == [item * item for item in items]
    assert os.getpid() not in {process for _, process in results}


def test_pool_workers_use_one_blas_thread_each() -> None:
    per_item = map_in_processes(blas_threads, [0, 1], workers=2, description="test", progress=False)
    assert all(threads and set(threads) == {1} for threads in per_item), per_item


def test_a_worker_error_reaches_the_caller_with_its_message() -> None:
    with pytest.raises(UserInputError, match="item 3 is bad"):
        map_in_processes(refuse_three, list(range(6)), workers=2, description="test", progress=False)
