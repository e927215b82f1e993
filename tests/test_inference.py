"""Loading checkpoints for inference: preprocessing records, stored tile thresholds, input tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from weakseg import inference
from weakseg.inference import InferenceError, Preprocessing
from weakseg.models import CheckpointError, build_classifier, build_segmenter, save_checkpoint
from weakseg.preprocessing import images_to_tensor
from weakseg.training.common import preprocessing_record

CPU = torch.device("cpu")


def test_input_tensor_is_the_shared_preprocessing_made_contiguous(rng: np.random.Generator) -> None:
    images = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    ours = inference.to_input_tensor(images, Preprocessing(tile_size=16), CPU)
    assert ours.is_contiguous() and ours.device == CPU
    assert torch.equal(ours, images_to_tensor(images))
    custom = Preprocessing(16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 200.0)
    expected = images_to_tensor(images, custom.mean, custom.std, custom.scale)
    assert torch.equal(inference.to_input_tensor(images, custom, CPU), expected)
    assert not torch.equal(expected, images_to_tensor(images))


def _save_models(folder: Path, tile_size: int) -> tuple[Path, Path]:
    torch.manual_seed(0)
    classifier_path, segmenter_path = folder / "classifier.pt", folder / "segmenter.pt"
    record = preprocessing_record(tile_size)
    save_checkpoint(classifier_path, "classifier", "resnet18", build_classifier("resnet18"), preprocessing=record)
    save_checkpoint(segmenter_path, "segmenter", "resnet18", build_segmenter("resnet18"), preprocessing=record)
    return classifier_path, segmenter_path


def test_load_model_names_the_file_on_wrong_kind_or_missing_record(tmp_path: Path) -> None:
    classifier_path, _ = _save_models(tmp_path, 32)
    with pytest.raises(CheckpointError, match="classifier.pt"):
        inference.load_model(classifier_path, "segmenter", CPU)
    bare = tmp_path / "bare.pt"
    save_checkpoint(bare, "classifier", "resnet18", build_classifier("resnet18"))
    with pytest.raises(InferenceError, match="bare.pt.*tile_size"):
        inference.load_model(bare, "classifier", CPU)


@pytest.mark.parametrize("stored", [1.5, 0.0, "0.7"])
def test_load_model_refuses_an_unusable_head_threshold(tmp_path: Path, stored: object) -> None:
    path = tmp_path / "odd.pt"
    save_checkpoint(
        path,
        "segmenter",
        "resnet18",
        build_segmenter("resnet18"),
        preprocessing=preprocessing_record(32),
        head_threshold=stored,
    )
    with pytest.raises(InferenceError, match=r"odd\.pt.*head_threshold"):
        inference.load_model(path, "segmenter", CPU)


def test_load_model_exposes_the_stored_head_threshold(tmp_path: Path) -> None:
    path = tmp_path / "segmenter.pt"
    save_checkpoint(
        path,
        "segmenter",
        "resnet18",
        build_segmenter("resnet18"),
        preprocessing=preprocessing_record(32),
        head_threshold=0.83,
    )
    assert inference.load_model(path, "segmenter", CPU).head_threshold == 0.83


def test_load_model_exposes_the_classifiers_stored_decision_threshold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "classifier.pt"
    record = preprocessing_record(32)
    model = build_classifier("resnet18")
    save_checkpoint(path, "classifier", "resnet18", model, preprocessing=record, decision_threshold=0.81)
    with caplog.at_level("WARNING", logger="weakseg.inference"):
        assert inference.load_model(path, "classifier", CPU).decision_threshold == 0.81
    assert not caplog.records
    # A checkpoint from before the threshold was stored: 0.5, with a warning naming the file and the key.
    old = tmp_path / "old_classifier.pt"
    save_checkpoint(old, "classifier", "resnet18", build_classifier("resnet18"), preprocessing=record)
    with caplog.at_level("WARNING", logger="weakseg.inference"):
        assert inference.load_model(old, "classifier", CPU).decision_threshold == 0.5
    assert any("old_classifier.pt" in r.getMessage() and "decision_threshold" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("stored", [1.0, -0.2, "0.7", True])
def test_load_model_refuses_an_unusable_decision_threshold(tmp_path: Path, stored: object) -> None:
    path = tmp_path / "odd.pt"
    save_checkpoint(
        path,
        "classifier",
        "resnet18",
        build_classifier("resnet18"),
        preprocessing=preprocessing_record(32),
        decision_threshold=stored,
    )
    with pytest.raises(InferenceError, match=r"odd\.pt.*decision_threshold"):
        inference.load_model(path, "classifier", CPU)


class _BiasedSegmenter(torch.nn.Module):
    """Pixel logits: the first channel plus a left-to-right ramp (an orientation bias); head: the channel's mean."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        ramp = torch.arange(images.shape[3], dtype=torch.float32).expand(images.shape[2], -1)
        pixels = images[:, :1] + ramp
        return pixels, images[:, 0, :, :2].mean(dim=(1, 2))[:, None]  # head reads the left edge


class _CountingClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images[:, 0, :, :2].mean(dim=(1, 2))[:, None]


def test_dihedral_forward_averages_pixel_logits_and_keeps_tile_logits_of_the_tile_as_it_is() -> None:
    images = torch.rand((2, 3, 6, 6), generator=torch.Generator().manual_seed(0))
    segmenter, classifier = _BiasedSegmenter(), _CountingClassifier()
    plain_pixels, plain_tiles = inference.make_forward(segmenter, classifier)(images)
    segmenter.calls = classifier.calls = 0
    pixels, tiles = inference.make_forward(segmenter, classifier, "dihedral")(images)
    assert plain_pixels is not None and pixels is not None
    # The tile's own channel follows every view back; the ramp's bias averages to its mean, 2.5.
    torch.testing.assert_close(pixels, images[:, 0] + 2.5)
    torch.testing.assert_close(plain_pixels, images[:, 0] + torch.arange(6.0))
    # Tile decisions keep the thresholds chosen on validation: same logits as without augmentation.
    torch.testing.assert_close(tiles["head"], plain_tiles["head"])
    torch.testing.assert_close(tiles["classifier"], plain_tiles["classifier"])
    assert (segmenter.calls, classifier.calls) == (8, 1)


def test_make_forward_names_an_unknown_test_time_augmentation() -> None:
    with pytest.raises(InferenceError, match="test_time_augmentation.*'flips'"):
        inference.make_forward(_BiasedSegmenter(), None, "flips")
