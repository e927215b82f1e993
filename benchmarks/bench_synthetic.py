"""How fast the synthetic generator renders and writes tiles (issue 2: 500 tiles of 224 px in < 30 s).

Run: ``.venv/bin/python -m benchmarks.bench_synthetic`` (prints JSON).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from weakseg.data.synthetic import generate_dataset, render_tile
from weakseg.params import SyntheticSourceParams


def run(tile_size: int = 224, render_tiles: int = 50, dataset_tiles: int = 100, repeats: int = 3) -> dict:
    """Measures rendering alone and the whole dataset writer (PNG encoding included).

    Args:
        tile_size: tile side in pixels.
        render_tiles: tiles rendered in memory per repeat.
        dataset_tiles: tiles written by ``generate_dataset`` per repeat.
        repeats: timed repeats after one warm-up; medians are reported.

    Returns:
        Tiles per second for rendering and for writing a dataset, and the projected wall-clock and CPU
        seconds for 500 tiles.
    """
    render_tile(np.random.default_rng(0), tile_size, True)  # warm-up (imports, caches)
    render_times, write_times, write_cpu_times = [], [], []
    for repeat in range(repeats):
        started = time.perf_counter()
        for index in range(render_tiles):
            render_tile(np.random.default_rng([repeat, index]), tile_size, index % 3 == 0)
        render_times.append(time.perf_counter() - started)
        with tempfile.TemporaryDirectory() as folder:
            params = SyntheticSourceParams(num_tiles=dataset_tiles, tile_size=tile_size, seed=repeat)
            started, started_cpu = time.perf_counter(), time.process_time()
            generate_dataset(Path(folder), params)
            write_times.append(time.perf_counter() - started)
            write_cpu_times.append(time.process_time() - started_cpu)
    render_rate = render_tiles / statistics.median(render_times)
    write_rate = dataset_tiles / statistics.median(write_times)
    return {
        "tile_size": tile_size,
        "render_tiles_per_second": round(render_rate, 1),
        "dataset_tiles_per_second": round(write_rate, 1),
        "projected_seconds_for_500_tiles": round(500 / write_rate, 2),
        # CPU time is what one core spends, whatever else the machine is running at the same time.
        "projected_cpu_seconds_for_500_tiles": round(500 * statistics.median(write_cpu_times) / dataset_tiles, 2),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
