"""The one preprocessing of uint8 tiles into model input, shared by training, CAMs and inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weakseg.cam import images_to_model_input
from weakseg.models import IMAGENET_MEAN, IMAGENET_STD
from weakseg.preprocessing import images_to_tensor, tile_to_tensor
from weakseg.training.datasets import TileDataset


def _reference(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], scale: float) -> torch.Tensor:
    """The arithmetic written out step by step: uint8 -> float32, / scale, - mean, / std, in that order."""
    values = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
    values = values / torch.tensor(scale, dtype=torch.float32)
    values = values - torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    return values / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)


def _bit_equal(first: torch.Tensor, second: torch.Tensor) -> bool:
    return (
        first.dtype == second.dtype
        and first.shape == second.shape
        and bool(
            np.array_equal(first.contiguous().numpy().view(np.uint32), second.contiguous().numpy().view(np.uint32))
        )
    )


@pytest.mark.parametrize("shape", [(4, 16, 16, 3), (1, 9, 23, 3)])
def test_tiles_become_the_normalized_float32_tensor_bit_for_bit(
    shape: tuple[int, ...], rng: np.random.Generator
) -> None:
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    tensor = images_to_tensor(images)
    assert tensor.dtype == torch.float32 and tensor.shape == (shape[0], 3, shape[1], shape[2])
    assert _bit_equal(tensor, _reference(images, IMAGENET_MEAN, IMAGENET_STD, 255.0))
    custom = images_to_tensor(images, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 200.0)
    assert _bit_equal(custom, _reference(images, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 200.0))
    assert not torch.equal(custom, tensor)


def test_a_list_and_a_single_tile_give_what_the_stacked_array_gives(rng: np.random.Generator) -> None:
    images = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    stacked = images_to_tensor(images)
    assert _bit_equal(images_to_tensor(list(images)), stacked)
    assert _bit_equal(images_to_tensor(images[1]), stacked[1:2])


def test_the_layout_stays_channels_last_and_a_cpu_device_keeps_the_tensor_on_the_cpu(rng: np.random.Generator) -> None:
    images = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    tensor = images_to_tensor(images, device=torch.device("cpu"))
    # The permuted layout reaches the model as it always did (convolution kernels may depend on it).
    assert tensor.device == torch.device("cpu")
    assert not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last)


def test_cam_input_uses_the_checkpoints_record_or_imagenet_statistics(rng: np.random.Generator) -> None:
    images = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    assert _bit_equal(images_to_model_input(images), images_to_tensor(images))
    record = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "scale": 200.0, "tile_size": 8}
    expected = _reference(images, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 200.0)
    assert _bit_equal(images_to_model_input(images, record), expected)


def test_the_training_dataset_normalizes_to_within_float_rounding(rng: np.random.Generator) -> None:
    # TileDataset uses tile_to_tensor, (x - 255 mean) / (255 std) in NumPy: the same values up to rounding,
    # not the same bits (kept so that training runs reproduce their earlier numbers).
    images = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    dataset = TileDataset(images, [True, False, True])
    items = torch.stack([dataset[index][0] for index in range(3)])
    torch.testing.assert_close(items, images_to_tensor(images).contiguous(), rtol=0, atol=1e-6)
    numpy_path = (images[1].astype(np.float32) - np.float32(255.0) * np.asarray(IMAGENET_MEAN, np.float32)) / (
        np.asarray(IMAGENET_STD, np.float32) * np.float32(255.0)
    )
    assert _bit_equal(tile_to_tensor(images[1]), torch.from_numpy(np.ascontiguousarray(numpy_path.transpose(2, 0, 1))))
    assert _bit_equal(items[1], tile_to_tensor(images[1]))
