"""Benchmark of the refine_masks chain: serial versus process-pool throughput on 224 px tiles.

Builds seeded synthetic tiles on disk (an H&E-like two-stain image, a smooth CAM upsampled from a 7x7 grid
as a ResNet's layer4 gives at 224 px, a tissue mask with glass), runs the stage's ``refine_all`` with one
worker and with a pool, and reports medians after a warm-up, plus the projected time for MHIST's 3,152
tiles. Usage: ``.venv/bin/python -m benchmarks.bench_refine [--tiles 256] [--repeats 3] [--workers 0]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter, zoom

from weakseg.io import write_png
from weakseg.parallel import resolve_workers
from weakseg.pseudo_masks import TileJob, refine_all
from weakseg.refine import RefineSettings

MHIST_TILES = 3152


def synthetic_tile(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An H&E-like RGB tile, a 7x7-grid CAM upsampled to ``size``, and a tissue mask with some glass."""
    field = gaussian_filter(rng.random((size, size)), sigma=size / 20)
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    haematoxylin = np.array([90, 50, 160], dtype=np.float64)
    eosin = np.array([235, 150, 200], dtype=np.float64)
    image = field[..., None] * haematoxylin + (1 - field[..., None]) * eosin
    image += rng.normal(0, 8, image.shape)
    glass = gaussian_filter(rng.random((size, size)), sigma=size / 10)
    tissue = glass < np.quantile(glass, 0.85)
    image[~tissue] = (245, 245, 245)
    cam = zoom(rng.random((7, 7)), size / 7, order=1)[:size, :size]
    cam = (cam - cam.min()) / (np.ptp(cam) + 1e-9)
    return (
        np.clip(image, 0, 255).astype(np.uint8),
        (cam * 255).round().astype(np.uint8),
        tissue,
    )


def make_jobs(root: Path, count: int, size: int, seed: int = 0) -> list[TileJob]:
    """Writes ``count`` synthetic tiles under ``root`` and returns their jobs (every tile positive)."""
    rng = np.random.default_rng(seed)
    jobs: list[TileJob] = []
    for index in range(count):
        image, cam, tissue = synthetic_tile(rng, size)
        name = f"tile_{index:05d}.png"
        write_png(root / "images" / name, image)
        write_png(root / "tissue" / name, tissue)
        write_png(root / "cams" / name, cam)
        jobs.append(
            TileJob(
                name=name,
                positive=True,
                refine=True,
                image=root / "images" / name,
                tissue=root / "tissue" / name,
                cam=root / "cams" / name,
                truth=None,
                output=root / "out" / name,
            )
        )
    return jobs


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the pool's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _median_seconds(jobs: list[TileJob], settings: RefineSettings, workers: int, repeats: int) -> tuple[float, float]:
    """Median wall-clock seconds and median CPU seconds of ``repeats`` runs, after a warm-up."""
    refine_all(jobs[: max(2, workers * 2)], settings, workers, progress=False)  # warm-up: imports, caches
    walls, cpus = [], []
    for _ in range(repeats):
        cpu_started, started = _cpu_seconds(), time.perf_counter()
        refine_all(jobs, settings, workers, progress=False)
        walls.append(time.perf_counter() - started)
        cpus.append(_cpu_seconds() - cpu_started)
    return statistics.median(walls), statistics.median(cpus)


def run(tiles: int = 256, size: int = 224, repeats: int = 3, workers: int = 0) -> dict[str, Any]:
    """Measures serial and pooled throughput of the full chain (threshold, morphology, CRF, PNG I/O).

    Args:
        tiles: tiles per timed run.
        size: tile side in pixels (MHIST: 224).
        repeats: timed runs per setting; the median is reported.
        workers: pool size (0: every core).

    Returns:
        Seconds per run, per-tile milliseconds, speed-up, and the projected time for 3,152 tiles.
    """
    settings = RefineSettings()
    pool = resolve_workers(workers)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-refine-") as folder:
        jobs = make_jobs(Path(folder), tiles, size)
        serial, serial_cpu = _median_seconds(jobs, settings, 1, repeats)
        parallel, parallel_cpu = _median_seconds(jobs, settings, pool, repeats)
    cpu_per_tile = serial_cpu / tiles
    return {
        # Other processes on the machine slow both runs and hide the speed-up: read the load first.
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "cores": os.cpu_count(),
        "tiles": tiles,
        "tile_size": size,
        "repeats": repeats,
        "workers": pool,
        "serial_seconds": round(serial, 3),
        "parallel_seconds": round(parallel, 3),
        "serial_ms_per_tile": round(1000 * serial / tiles, 2),
        "parallel_ms_per_tile": round(1000 * parallel / tiles, 2),
        "speedup": round(serial / parallel, 3),
        "projected_mhist_seconds_parallel": round(parallel / tiles * MHIST_TILES, 1),
        "serial_cpu_ms_per_tile": round(1000 * cpu_per_tile, 2),
        "parallel_cpu_ms_per_tile": round(1000 * parallel_cpu / tiles, 2),
        # What an otherwise idle machine would take: CPU work spread evenly over the pool.
        "projected_mhist_seconds_idle_machine": round(cpu_per_tile * MHIST_TILES / pool, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    arguments = parser.parse_args()
    print(json.dumps(run(arguments.tiles, arguments.size, arguments.repeats, arguments.workers), indent=2))
