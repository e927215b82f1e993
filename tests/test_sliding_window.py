"""Sliding-window inference: windows, blending, padding, ordering, and agreement with the bare models."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_inference import _save_models
from weakseg import inference, sliding_window
from weakseg.inference import InferenceError, Preprocessing
from weakseg.preprocessing import images_to_tensor

CPU = torch.device("cpu")


def _pointwise_forward(images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A position-independent model: the pixel logit is a function of that pixel's colour only."""
    pixel_logits = images[:, 0] - 0.5 * images[:, 1] + 0.25 * images[:, 2]
    return pixel_logits, {"head": images.mean(dim=(1, 2, 3))}


def _constant_forward(images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    batch, _, height, width = images.shape
    return torch.full((batch, height, width), 0.7), {"head": torch.full((batch,), -1.0)}


@pytest.mark.parametrize(
    ("length", "window", "overlap", "expected"),
    [(32, 32, 8, [0]), (20, 32, 8, [0]), (64, 32, 0, [0, 32]), (600, 128, 32, [0, 94, 189, 283, 378, 472])],
)
def test_window_starts_cover_the_length(length: int, window: int, overlap: int, expected: list[int]) -> None:
    starts = sliding_window.window_starts(length, window, overlap)
    assert starts == expected
    assert starts[-1] + window >= length
    assert all(later - earlier <= window - overlap for earlier, later in pairwise(starts))


@pytest.mark.parametrize("overlap", [-1, 32, 40])
def test_window_starts_refuse_bad_overlap(overlap: int) -> None:
    with pytest.raises(InferenceError, match="overlap"):
        sliding_window.window_starts(100, 32, overlap)


def test_blending_window_is_positive_and_peaks_in_the_centre() -> None:
    weight = sliding_window.blending_window(32)
    assert weight.shape == (32, 32)
    assert weight.min() >= sliding_window.WINDOW_EDGE_WEIGHT**2 - 1e-6
    assert weight[15:17, 15:17].min() > 0.99
    np.testing.assert_allclose(weight, weight.T)


def test_constant_model_stitches_seamlessly(rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, size=(500, 600, 3), dtype=np.uint8)
    (prediction,) = sliding_window.predict_batch([image], _constant_forward, Preprocessing(tile_size=64), CPU, 7, 16)
    assert prediction.probability is not None and prediction.probability.shape == (500, 600)
    np.testing.assert_allclose(prediction.probability, 1 / (1 + np.exp(-0.7)), rtol=1e-5)
    assert prediction.windows == 11 * 13  # stride 48: ceil(436/48) + 1 rows, ceil(536/48) + 1 columns
    assert prediction.tile_probabilities["head"] == pytest.approx(1 / (1 + np.exp(1.0)))


def test_position_independent_model_stitches_to_the_whole_image_answer(rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, size=(150, 110, 3), dtype=np.uint8)
    preprocessing = Preprocessing(tile_size=32)
    (tiled,) = sliding_window.predict_batch([image], _pointwise_forward, preprocessing, CPU, batch_size=5, overlap=8)
    whole_logits, _ = _pointwise_forward(inference.to_input_tensor(image[None], preprocessing, CPU))
    expected = torch.sigmoid(whole_logits[0]).numpy()
    assert tiled.probability is not None
    np.testing.assert_allclose(tiled.probability, expected, atol=1e-5)


def test_small_image_is_padded_by_reflection_and_cropped_back(rng: np.random.Generator) -> None:
    seen: list[torch.Tensor] = []

    def recording(images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        seen.append(images.clone())
        return _pointwise_forward(images)

    image = rng.integers(0, 256, size=(20, 10, 3), dtype=np.uint8)
    (prediction,) = sliding_window.predict_batch([image], recording, Preprocessing(tile_size=32), CPU)
    assert prediction.probability is not None and prediction.probability.shape == (20, 10)
    assert seen[0].shape == (1, 3, 32, 32)
    padded = sliding_window.pad_to_window(image, 32)
    assert padded.shape == (32, 32, 3)
    # Reflection: row 20 mirrors row 18, column 10 mirrors column 8.
    np.testing.assert_array_equal(padded[20, :10], image[18])
    np.testing.assert_array_equal(padded[:20, 10], image[:, 8])


def test_batches_span_images_and_results_keep_input_order(rng: np.random.Generator) -> None:
    batch_sizes: list[int] = []

    def counting(images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch_sizes.append(images.shape[0])
        return _pointwise_forward(images)

    images = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(5)]
    images.insert(2, rng.integers(0, 256, size=(64, 40, 3), dtype=np.uint8))  # four windows
    results = list(
        sliding_window.predict_images(
            ((f"k{i}", im) for i, im in enumerate(images)), counting, Preprocessing(32), CPU, 3
        )
    )
    assert [key for key, _ in results] == [f"k{i}" for i in range(6)]
    assert batch_sizes == [3, 3, 3]
    for (_, prediction), image in zip(results, images, strict=True):
        assert prediction.probability is not None and prediction.probability.shape == image.shape[:2]


def test_bad_image_and_batch_size_are_refused() -> None:
    with pytest.raises(InferenceError, match="batch size"):
        sliding_window.predict_batch(
            [np.zeros((8, 8, 3), np.uint8)], _constant_forward, Preprocessing(8), CPU, batch_size=0
        )
    with pytest.raises(InferenceError, match="bad.png"):
        list(
            sliding_window.predict_images(
                [("bad.png", np.zeros((8, 8), np.uint8))], _constant_forward, Preprocessing(8), CPU
            )
        )


def test_real_models_match_their_bare_forward(tmp_path: Path, rng: np.random.Generator) -> None:
    classifier_path, segmenter_path = _save_models(tmp_path, 32)
    classifier = inference.load_model(classifier_path, "classifier", CPU)
    segmenter = inference.load_model(segmenter_path, "segmenter", CPU)
    assert segmenter.preprocessing.tile_size == 32
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    forward = inference.make_forward(segmenter.model, classifier.model)
    predictions = sliding_window.predict_batch(list(images), forward, segmenter.preprocessing, CPU, batch_size=2)
    with torch.inference_mode():
        tensor = images_to_tensor(images)
        mask_logits, label_logits = segmenter.model(tensor)
        classifier_logits = classifier.model(tensor)
    for index, prediction in enumerate(predictions):
        assert prediction.probability is not None
        np.testing.assert_allclose(prediction.probability, torch.sigmoid(mask_logits[index, 0]).numpy(), atol=1e-5)
        assert prediction.tile_probabilities["head"] == pytest.approx(
            float(torch.sigmoid(label_logits[index, 0])), abs=1e-5
        )
        assert prediction.tile_probabilities["classifier"] == pytest.approx(
            float(torch.sigmoid(classifier_logits[index, 0])), abs=1e-5
        )
