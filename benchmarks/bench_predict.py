"""Throughput of prediction against the bare segmenter's forward pass.

Three numbers, each the median of ``repeats`` timed runs after one warm-up:

- ``bare_tiles_per_second``: the segmenter's forward pass alone, on a ready normalized batch on the device;
- ``inference_tiles_per_second``: :func:`weakseg.sliding_window.predict_images` on uint8 tiles in memory
  (conversion, transfer, forward, probabilities back on the host), and its ratio to the bare forward
  (target >= 0.8);
- ``command_tiles_per_second``: the whole ``predict`` command on a folder of PNG tiles (decoding, tissue
  masks, four PNGs and a CSV written per tile), for information: file work is not the model's.

Run: ``python -m benchmarks.bench_predict [--tile-size 224 --tiles 256 --batch-size 32 --device cuda]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weakseg import predict
from weakseg.distributed import select_device
from weakseg.inference import Preprocessing, make_forward, to_input_tensor
from weakseg.io import write_png
from weakseg.models import build_segmenter, save_checkpoint
from weakseg.sliding_window import predict_images
from weakseg.training.common import preprocessing_record


def _median_seconds(work: Callable[[], None], repeats: int, device: torch.device) -> float:
    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    timed()  # warm-up: allocator, cuDNN algorithm choice, lazy imports
    return statistics.median(timed() for _ in range(repeats))


def run(
    tile_size: int = 128,
    tiles: int = 32,
    batch_size: int = 16,
    repeats: int = 3,
    device: str = "auto",
    encoder: str = "resnet18",
    command: bool = True,
) -> dict[str, Any]:
    """Measures tiles per second of the bare forward, of batched inference and of the predict command.

    Args:
        tile_size: square tile side in pixels (MHIST: 224).
        tiles: tiles per timed run.
        batch_size: windows per forward pass, the same for every measurement.
        repeats: timed runs per number (the median is reported).
        device: 'auto', 'cpu' or 'cuda'.
        encoder: the segmenter's ResNet encoder.
        command: also time the whole command on PNG files.

    Returns:
        The measured numbers and the settings they were measured with.
    """
    torch_device = select_device(device)
    torch.manual_seed(0)
    model = build_segmenter(encoder).to(torch_device).eval()
    preprocessing = Preprocessing(tile_size=tile_size)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(tiles, tile_size, tile_size, 3), dtype=np.uint8)

    batches = [
        to_input_tensor(images[start : start + batch_size], preprocessing, torch_device)
        for start in range(0, tiles, batch_size)
    ]

    def bare() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(batch)

    forward = make_forward(model)

    def inference() -> None:
        for _ in predict_images(enumerate(images), forward, preprocessing, torch_device, batch_size):
            pass

    bare_seconds = _median_seconds(bare, repeats, torch_device)
    inference_seconds = _median_seconds(inference, repeats, torch_device)
    result: dict[str, Any] = {
        "device": str(torch_device),
        "device_name": torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "encoder": encoder,
        "tile_size": tile_size,
        "tiles": tiles,
        "batch_size": batch_size,
        "repeats": repeats,
        "bare_tiles_per_second": tiles / bare_seconds,
        "inference_tiles_per_second": tiles / inference_seconds,
        "inference_ratio_to_bare": bare_seconds / inference_seconds,
        # The name benchmarks/run_all.py checks against the target (>= 0.8).
        "ratio_to_bare_forward": bare_seconds / inference_seconds,
    }
    if command:
        with tempfile.TemporaryDirectory(prefix="weakseg-bench-") as scratch:
            folder = Path(scratch)
            for index, image in enumerate(images):
                write_png(folder / "in" / f"tile_{index:04d}.png", image)
            checkpoint = folder / "segmenter.pt"
            save_checkpoint(
                checkpoint,
                "segmenter",
                encoder,
                model.cpu(),
                preprocessing=preprocessing_record(tile_size),
                head_threshold=0.5,
            )
            model.to(torch_device)
            argv = [
                "--input",
                str(folder / "in"),
                "--output",
                str(folder / "out"),
                "--segmenter",
                str(checkpoint),
                "--stain-reference",
                "none",
                "--device",
                torch_device.type,
                "--batch-size",
                str(batch_size),
            ]

            def whole_command() -> None:
                if predict.main(argv) != 0:
                    raise RuntimeError("predict failed during the benchmark")

            command_seconds = _median_seconds(whole_command, repeats, torch_device)
        result["command_tiles_per_second"] = tiles / command_seconds
        result["command_ratio_to_bare"] = bare_seconds / command_seconds
    return result


def main() -> None:
    """Prints :func:`run`'s numbers as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--tiles", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--no-command", action="store_true", help="skip timing the whole command")
    arguments = parser.parse_args()
    print(
        json.dumps(
            run(
                arguments.tile_size,
                arguments.tiles,
                arguments.batch_size,
                arguments.repeats,
                arguments.device,
                arguments.encoder,
                not arguments.no_command,
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
