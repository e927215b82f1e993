"""Segmenter training throughput: the real epoch loop against the bare model on in-memory tensors.

The epoch loop (:func:`weakseg.training.segmenter.train_one_epoch` over the curriculum's batches, with
augmentation, the data loader, the combined loss, clipping and SGD) is timed against a bare loop that
feeds one prepared batch tensor to the same model, loss and optimizer. Their ratio says how much the data
path costs; the target is at least 0.9.

Run: ``.venv/bin/python -m benchmarks.bench_train_segmenter``
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from weakseg.losses.segmentation import SegmentationLoss, SegmentationLossWeights
from weakseg.models import build_segmenter
from weakseg.params import AugmentParams, ResNetName, SegmenterParams
from weakseg.training.augment import build_augmentation
from weakseg.training.common import seed_everything
from weakseg.training.datasets import TileDataset
from weakseg.training.segmenter import train_one_epoch
from weakseg.training.segmenter_data import batch_loader, training_batches


def _synthetic_arrays(tiles: int, tile_size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(tiles, tile_size, tile_size, 3), dtype=np.uint8)
    masks = np.zeros((tiles, tile_size, tile_size), dtype=bool)
    positives = np.arange(tiles) % 2 == 0
    masks[positives, tile_size // 4 : tile_size // 2, tile_size // 4 : tile_size // 2] = True
    return images, masks, positives


def _bare_epoch(
    model: nn.Module,
    loss_function: SegmentationLoss,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    steps: int,
    grad_clip_norm: float,
) -> None:
    images, labels, masks = batch
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        mask_logits, label_logits = model(images)
        loss = loss_function(mask_logits, label_logits, masks, labels)
        loss.backward()
        if grad_clip_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()


def run(
    tiles: int = 64,
    tile_size: int = 128,
    batch_size: int = 16,
    encoder: ResNetName = "resnet18",
    repeats: int = 3,
    num_workers: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Measures training images per second of the epoch loop and of the bare model.

    Args:
        tiles: tiles per timed epoch (a multiple of ``batch_size`` keeps both loops at equal batches).
        tile_size: tile side in pixels.
        batch_size: images per step.
        encoder: the ResNet encoder.
        repeats: timed epochs per loop, after one warm-up epoch each; medians are reported.
        num_workers: data-loader workers of the epoch loop.
        seed: seed of weights and data.

    Returns:
        ``pipeline_images_per_second``, ``bare_images_per_second``, their ``ratio``,
        ``data_only_images_per_second`` (the loader without the model) and the settings.
    """
    seed_everything(seed)
    device = torch.device("cpu")
    params = SegmenterParams(encoder=encoder, batch_size=batch_size, num_workers=num_workers)
    images, masks, positives = _synthetic_arrays(tiles, tile_size, seed)
    model = build_segmenter(encoder, "none").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum)
    loss_function = SegmentationLoss(SegmentationLossWeights(**params.loss.model_dump()))
    augmentation = build_augmentation(AugmentParams(), seed)
    dataset = TileDataset(images, positives, masks, augmentation)
    batches = training_batches(np.arange(tiles), batch_size)
    steps = len(batches)
    images_per_epoch = sum(len(batch) for batch in batches)

    plain = TileDataset(images[:batch_size], positives[:batch_size], masks[:batch_size], None)
    items = [plain[index] for index in range(len(plain))]
    in_memory = tuple(torch.stack(parts) for parts in zip(*items, strict=True))

    def pipeline_epoch() -> None:
        loader = batch_loader(dataset, batches, num_workers)
        train_one_epoch(model, loader, loss_function, optimizer, device, params.grad_clip_norm, False, "bench")

    def bare_epoch() -> None:
        _bare_epoch(model, loss_function, optimizer, in_memory, steps, params.grad_clip_norm)  # type: ignore[arg-type]

    def data_only_epoch() -> None:
        for _batch in batch_loader(dataset, batches, num_workers):
            pass

    timings: dict[str, list[float]] = {"pipeline": [], "bare": [], "data_only": []}
    pipeline_epoch()
    bare_epoch()
    for _ in range(repeats):
        # Interleaved, so that load from other processes hits both loops alike.
        for name, epoch in (("pipeline", pipeline_epoch), ("bare", bare_epoch), ("data_only", data_only_epoch)):
            started = time.perf_counter()
            epoch()
            timings[name].append(time.perf_counter() - started)
    bare_steps_images = steps * batch_size
    pipeline_rate = images_per_epoch / statistics.median(timings["pipeline"])
    bare_rate = bare_steps_images / statistics.median(timings["bare"])
    return {
        "pipeline_images_per_second": pipeline_rate,
        "bare_images_per_second": bare_rate,
        "ratio": pipeline_rate / bare_rate,
        # The data path alone (augmentation, normalization, collation): the part the ratio charges to it.
        "data_only_images_per_second": images_per_epoch / statistics.median(timings["data_only"]),
        "tiles": tiles,
        "tile_size": tile_size,
        "batch_size": batch_size,
        "encoder": encoder,
        "repeats": repeats,
        "num_workers": num_workers,
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
