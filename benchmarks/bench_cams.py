"""Benchmark of CAM generation: milliseconds per tile for each torchcam method on an untrained ResNet.

Usage: ``.venv/bin/python -m benchmarks.bench_cams [--size 128] [--tiles 16] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from weakseg.cam import CAM_METHODS, compute_cams
from weakseg.models import build_classifier


def run(
    size: int = 128,
    tiles: int = 16,
    repeats: int = 3,
    methods: tuple[str, ...] = CAM_METHODS,
    num_samples: int = 4,
    arch: str = "resnet18",
    device: str = "cpu",
) -> dict[str, Any]:
    """Median milliseconds per tile of :func:`compute_cams` for each method, after a warm-up.

    Args:
        size: tile side in pixels.
        tiles: tiles per batch (one call).
        repeats: timed calls per method.
        methods: CAM methods to time.
        num_samples: Smooth Grad-CAM++ noise samples.
        arch: classifier architecture.
        device: ``cpu`` or ``cuda``.
    """
    torch.manual_seed(0)
    model = build_classifier(arch).eval()
    images = np.random.default_rng(0).integers(0, 256, (tiles, size, size, 3), dtype=np.uint8)
    labels = [index % 2 == 0 for index in range(tiles)]
    report: dict[str, Any] = {
        "size": size,
        "tiles": tiles,
        "arch": arch,
        "num_samples": num_samples,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": round(os.getloadavg()[0], 2),
        "ms_per_tile": {},
    }
    for method in methods:
        compute_cams(model, images[:2], labels[:2], method=method, num_samples=num_samples, device=device)
        times = []
        for repeat in range(repeats):
            started = time.perf_counter()
            compute_cams(model, images, labels, method=method, num_samples=num_samples, seed=repeat, device=device)
            times.append(time.perf_counter() - started)
        report["ms_per_tile"][method] = round(1000 * statistics.median(times) / tiles, 1)
    report["load_average_after"] = round(os.getloadavg()[0], 2)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=list(CAM_METHODS), choices=CAM_METHODS)
    arguments = parser.parse_args()
    print(
        json.dumps(
            run(arguments.size, arguments.tiles, arguments.repeats, tuple(arguments.methods), arguments.num_samples),
            indent=2,
        )
    )
