"""Benchmark of the normalize stage: tiles per second, process-pool speed-up, and speed against torchstain.

Uses the shared real tiles (``../shared/data/ebhi-hgin-polyp``, 224x224) when present, else generated
224x224 H&E-like tiles. Every figure is the median of ``repeats`` runs after one warm-up run.

    .venv/bin/python -m benchmarks.bench_normalize [--tiles 240] [--repeats 3] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

MHIST_TILES = 3152
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ebhi-hgin-polyp"


def generated_tiles(count: int, size: int = 224, seed: int = 0) -> list[np.ndarray]:
    """H&E-like tiles: hematoxylin blobs on eosin stroma with a white lumen, under varied stain vectors."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:size, 0:size]
    tiles = []
    for _ in range(count):
        eosin = ndimage.gaussian_filter(rng.random((size, size)), 8)
        eosin = (eosin - eosin.min()) / np.ptp(eosin) * 0.7 + 0.2
        hematoxylin = np.zeros((size, size))
        for _ in range(60):
            centre, radius = rng.uniform(0, size, 2), rng.uniform(3, 7)
            hematoxylin[(rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 < radius**2] = rng.uniform(0.8, 1.6)
        lumen = ((rows - rng.uniform(0, size)) ** 2 + (columns - rng.uniform(0, size)) ** 2) < rng.uniform(20, 60) ** 2
        hematoxylin[lumen] = eosin[lumen] = 0
        stains = np.array([[0.65, 0.2], [0.7, 0.85], [0.3, 0.5]]) + rng.normal(0, 0.05, (3, 2))
        stains /= np.linalg.norm(stains, axis=0)
        density = hematoxylin[..., None] * stains[:, 0] + eosin[..., None] * stains[:, 1]
        noisy = 240 * np.exp(-density) + rng.normal(0, 1.5, density.shape)
        tiles.append(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    return tiles


def _sorting_work(seed: int) -> int:
    values = np.random.default_rng(seed).random(200_000)
    for _ in range(40):
        np.sort(values)
    return seed


def control_pool_speedup(workers: int, jobs: int = 8) -> float:
    """The speed-up of a pure, known-parallel NumPy workload on the same pool size.

    On a shared machine the cores may be busy with other work; this says how much parallelism there was
    to have, so the stage's own speed-up can be read against it.
    """
    from concurrent.futures import ProcessPoolExecutor

    started = time.perf_counter()
    for seed in range(jobs):
        _sorting_work(seed)
    serial = time.perf_counter() - started
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_sorting_work, range(workers)))  # warm-up: start the processes
        started = time.perf_counter()
        list(pool.map(_sorting_work, range(jobs)))
        parallel = time.perf_counter() - started
    return serial / parallel


def load_tiles(count: int) -> tuple[list[np.ndarray], str]:
    """``count`` tiles (repeating the set if it has fewer), and where they came from."""
    from weakseg.io import read_rgb

    if (SHARED_DATA / "images").is_dir():
        paths = sorted((SHARED_DATA / "images").iterdir())
        return [read_rgb(paths[index % len(paths)]) for index in range(count)], str(SHARED_DATA)
    return generated_tiles(count), "generated 224x224 tiles"


def paired_median_seconds(
    first: Callable[[], object], second: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median wall times of two workloads timed in alternation (after a warm-up of each).

    Alternating keeps a shared machine's changing load from favouring whichever ran in a quieter moment.
    """
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for work, into in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            work()
            into.append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def median_times(work: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time (this process and its joined children) after a warm-up.

    CPU time is what a busy shared machine distorts least: on idle cores, wall time is about CPU time
    divided by the workers.
    """
    work()
    walls, cpus = [], []
    for _ in range(repeats):
        before = os.times()
        started = time.perf_counter()
        work()
        walls.append(time.perf_counter() - started)
        after = os.times()
        cpus.append(sum(after[:4]) - sum(before[:4]))  # user + system, self + children
    return statistics.median(walls), statistics.median(cpus)


def run(tiles: int = 240, repeats: int = 3, workers: int = 0, library_tiles: int = 100) -> dict:
    """Measures the normalizer alone (ours against torchstain) and the stage's per-tile work on a pool.

    Args:
        tiles: tiles for the stage-throughput measurement (read, mask, normalize, write PNGs, measure).
        repeats: timed repeats after a warm-up.
        workers: pool size for the parallel measurement; 0 uses every core.
        library_tiles: tiles for the normalizer-only comparison.

    Returns:
        Tiles per second, speed-ups, the ratio to torchstain and an extrapolation to MHIST's 3,152 tiles.
    """
    from threadpoolctl import threadpool_limits
    from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer  # type: ignore[import-untyped]

    from weakseg.io import write_png
    from weakseg.normalization import NormalizeJob, process_tiles
    from weakseg.params import NormalizeParams
    from weakseg.stain import fit_stain_reference, normalize_tile

    images, source = load_tiles(max(tiles, library_tiles))
    reference = fit_stain_reference(images[:16])
    library = NumpyMacenkoNormalizer()
    library.HERef, library.maxCRef = reference.stain_matrix.copy(), reference.max_concentrations.copy()
    sample = images[:library_tiles]
    with threadpool_limits(1):  # one core each, as in the pool's workers
        ours, theirs = paired_median_seconds(
            lambda: [normalize_tile(image, reference) for image in sample],
            lambda: [library.normalize(image, stains=False) for image in sample],
            repeats,
        )

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    pool_size = workers or cores
    config = NormalizeParams(workers=pool_size)
    with tempfile.TemporaryDirectory(prefix="bench-normalize-") as folder:
        root = Path(folder)
        (root / "raw").mkdir()
        names = []
        for index, image in enumerate(images[:tiles]):
            names.append(f"tile_{index:05d}.png")
            write_png(root / "raw" / names[-1], image)
        for sub in ("images", "tissue"):
            (root / "out" / sub).mkdir(parents=True)
        job = NormalizeJob(root / "raw", root / "out", reference, config)
        with threadpool_limits(1):
            serial, serial_cpu = median_times(lambda: process_tiles(names, job, 1), repeats)
        parallel, parallel_cpu = median_times(lambda: process_tiles(names, job, pool_size), repeats)
    control = control_pool_speedup(pool_size)

    parallel_rate = tiles / parallel
    return {
        # The headline figures (benchmarks/run_all.py checks seconds_for_3152_tiles against 60 s).
        "seconds_for_3152_tiles": round(MHIST_TILES / parallel_rate, 1),
        "tiles_per_second": round(parallel_rate, 2),
        "pool_speedup": round(serial / parallel, 3),
        "speed_ratio_vs_torchstain": round(theirs / ours, 3),
        "source": source,
        "cores": cores,
        "workers": pool_size,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "normalizer": {
            "tiles": library_tiles,
            "ours_ms_per_tile": round(1000 * ours / library_tiles, 3),
            "torchstain_ms_per_tile": round(1000 * theirs / library_tiles, 3),
            "speed_ratio_vs_torchstain": round(theirs / ours, 3),
        },
        "stage": {
            "tiles": tiles,
            "tiles_per_second_one_worker": round(tiles / serial, 2),
            "tiles_per_second_pool": round(parallel_rate, 2),
            "pool_speedup": round(serial / parallel, 3),
            "control_pool_speedup_of_plain_numpy_work": round(control, 3),
            "extrapolated_seconds_for_3152_tiles": round(MHIST_TILES / parallel_rate, 1),
            "cpu_ms_per_tile_one_worker": round(1000 * serial_cpu / tiles, 2),
            "cpu_ms_per_tile_pool": round(1000 * parallel_cpu / tiles, 2),
            # What the wall time would be with the cores to ourselves (the load average above says how
            # far from that the measured figures are).
            "idle_estimate_seconds_for_3152_tiles": round(MHIST_TILES * parallel_cpu / tiles / pool_size, 1),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--library-tiles", type=int, default=100)
    arguments = parser.parse_args()
    print(json.dumps(run(arguments.tiles, arguments.repeats, arguments.workers, arguments.library_tiles), indent=2))


if __name__ == "__main__":
    main()
