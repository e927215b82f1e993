"""Classifier training throughput: the real loop (loader + augmentation + step) against the bare model.

The bare number is the forward + loss + backward + optimizer step of the same model on one in-memory
tensor batch of the same size, so the ratio says how much the data path (augmentation, normalization,
collation, the progress bar, the scheduler) costs. Target: a ratio of at least 0.9.

Run: ``.venv/bin/python -m benchmarks.bench_train_classifier [--tiles N] [--tile-size PX] [--batch-size B]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
import torch

from weakseg.distributed import select_device
from weakseg.models import build_classifier
from weakseg.params import AugmentParams, ClassifierParams, ResNetName
from weakseg.training import classifier as loop
from weakseg.training import classifier_data
from weakseg.training.augment import build_augmentation
from weakseg.training.common import configure_determinism, seed_everything
from weakseg.training.datasets import TileDataset


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(
    tiles: int = 128,
    tile_size: int = 128,
    batch_size: int = 32,
    arch: ResNetName = "resnet18",
    repeats: int = 3,
    device: str = "auto",
    num_workers: int = 0,
    mixed_precision: bool = False,
) -> dict[str, Any]:
    """Measures training images per second through the loop and through the bare model.

    Args:
        tiles: tiles per epoch (the loop's measure is one epoch; keep it a multiple of ``batch_size``).
        tile_size: tile side in pixels.
        batch_size: batch size of both measures.
        arch: ResNet architecture.
        repeats: timed repetitions after one warm-up (medians are reported).
        device: ``auto``, ``cpu`` or ``cuda``.
        num_workers: data-loader workers of the loop.
        mixed_precision: bf16 autocast (CUDA only) in both measures.

    Returns:
        Medians: ``loop_images_per_second``, ``bare_images_per_second``, their ``ratio``, and
        ``loader_images_per_second`` (the data path alone), with the settings. The ratio is the median of
        per-repeat ratios, each from adjacent measurements.
    """
    seed_everything(0)
    configure_determinism()
    target = select_device(device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(tiles, tile_size, tile_size, 3), dtype=np.uint8)
    labels = rng.random(tiles) < 0.3
    dataset = TileDataset(images, labels, augmentation=build_augmentation(AugmentParams(), seed=0))
    params = ClassifierParams(
        arch=arch, epochs=repeats + 1, batch_size=batch_size, num_workers=num_workers, mixed_precision=mixed_precision
    )
    model = build_classifier(arch, "none").to(target)
    loss_function = loop.build_loss(params)
    optimizer = loop.build_optimizer(model, params)
    steps = classifier_data.steps_per_epoch(tiles, batch_size)
    images_per_epoch = steps * batch_size if classifier_data.train_drops_last(tiles, batch_size) else tiles
    model.train()

    batch = torch.randn(batch_size, 3, tile_size, tile_size, device=target)
    targets = torch.from_numpy(labels[:batch_size].astype(np.float32)).to(target)

    def bare_rate() -> float:
        _synchronize(target)
        started = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(target.type, dtype=torch.bfloat16, enabled=mixed_precision and target.type == "cuda"):
                logits = model(batch)
            loss = loss_function(logits.float().reshape(-1), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _synchronize(target)
        return steps * batch_size / (time.perf_counter() - started)

    def loop_rate(epoch: int) -> float:
        loader = classifier_data.build_train_loader(dataset, batch_size, 0, epoch, num_workers, target.type == "cuda")
        _synchronize(target)
        started = time.perf_counter()
        loop.train_one_epoch(model, loader, loss_function, optimizer, None, target, mixed_precision, "benchmark")
        _synchronize(target)
        return images_per_epoch / (time.perf_counter() - started)

    def loader_rate(epoch: int) -> float:
        started = time.perf_counter()
        for _ in classifier_data.build_train_loader(dataset, batch_size, 0, epoch, num_workers, False):
            pass
        return images_per_epoch / (time.perf_counter() - started)

    # The measures alternate within each repeat, so a change in machine load hits both sides of the ratio.
    loop_rates: list[float] = []
    bare_rates: list[float] = []
    loader_rates: list[float] = []
    ratios: list[float] = []
    for epoch in range(repeats + 1):
        looped, bare, loaded = loop_rate(epoch), bare_rate(), loader_rate(epoch)
        if epoch > 0:  # the first repeat warms up allocators and kernels
            loop_rates.append(looped)
            bare_rates.append(bare)
            loader_rates.append(loaded)
            ratios.append(looped / bare)

    return {
        "arch": arch,
        "device": str(target),
        "tile_size": tile_size,
        "batch_size": batch_size,
        "images_per_epoch": images_per_epoch,
        "threads": torch.get_num_threads(),
        "num_workers": num_workers,
        "loop_images_per_second": statistics.median(loop_rates),
        "bare_images_per_second": statistics.median(bare_rates),
        "ratio": statistics.median(ratios),
        "loader_images_per_second": statistics.median(loader_rates),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=128)
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--mixed-precision", action="store_true")
    arguments = parser.parse_args()
    print(
        json.dumps(
            run(
                arguments.tiles,
                arguments.tile_size,
                arguments.batch_size,
                arguments.arch,
                arguments.repeats,
                arguments.device,
                arguments.num_workers,
                arguments.mixed_precision,
            ),
            indent=2,
        )
    )
