"""The committed presets stay runnable: each validates and names every key params.yaml has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from weakseg.params import load_params

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


def _key_paths(value: Any, prefix: str = "") -> set[str]:
    if not isinstance(value, dict):
        return {prefix}
    paths: set[str] = set()
    for key, inner in value.items():
        paths |= _key_paths(inner, f"{prefix}.{key}" if prefix else str(key))
    return paths


def test_there_are_the_paper_tiny_and_real_data_presets() -> None:
    assert {path.stem for path in PRESETS} >= {"paper-mhist", "tiny", "ebhi-cpu"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda path: path.stem)
def test_preset_validates_and_has_every_key_of_params_yaml(preset: Path) -> None:
    load_params(preset)
    expected = _key_paths(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert _key_paths(yaml.safe_load(preset.read_text())) == expected


def test_paper_preset_is_the_papers_configuration() -> None:
    params = load_params(ROOT / "presets" / "paper-mhist.yaml")
    assert (params.data.source, params.data.positive_label, params.data.tile_size) == ("mhist", "SSA", 224)
    assert params.classifier.arch == params.segmenter.encoder == "resnet101"
    assert (params.classifier.optimizer, params.classifier.lr, params.classifier.weight_decay) == ("sgd", 0.01, 0.01)
    assert (params.classifier.epochs, params.classifier.batch_size) == (25, 32)
    assert params.classifier.unfreeze.enabled and params.classifier.unfreeze.frozen_epochs == 5
    assert (params.classifier.focal_tversky.alpha, params.classifier.focal_tversky.beta) == (0.7, 0.3)
    assert (params.segmenter.optimizer, params.segmenter.lr, params.segmenter.epochs) == ("sgd", 0.001, 35)
    assert (
        params.segmenter.curriculum.positive_only_epochs,
        params.segmenter.curriculum.final_negative_probability,
    ) == (10, 0.3)
    assert (params.segmenter.loss.dice, params.segmenter.loss.lovasz, params.segmenter.loss.classification) == (
        1.0,
        0.5,
        0.2,
    )
    crf = params.refine.crf
    assert (crf.iterations, crf.gaussian.sxy, crf.gaussian.compat) == (5, 3.0, 3.0)
    assert (crf.bilateral.sxy, crf.bilateral.srgb, crf.bilateral.compat) == (80.0, 13.0, 10.0)
    assert (params.refine.threshold_quantile, params.refine.opening_kernel, params.refine.closing_kernel) == (0.5, 3, 5)
    assert params.refine.min_object_size == 64
