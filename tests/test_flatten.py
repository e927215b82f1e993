"""Tests of weakseg/flatten.py: nested mappings as dotted flat dictionaries."""

from __future__ import annotations

from collections import OrderedDict
from types import MappingProxyType

from weakseg.flatten import flatten


def test_leaves_are_keyed_by_their_dotted_path_in_depth_first_order() -> None:
    nested = {"b": {"y": 1, "x": {"q": 2.5}}, "a": "word", "c": [1, 2]}
    flat = flatten(nested)
    assert flat == {"b.y": 1, "b.x.q": 2.5, "a": "word", "c": [1, 2]}
    assert list(flat) == ["b.y", "b.x.q", "a", "c"]  # MLflow params keep this order


def test_prefix_goes_before_every_path() -> None:
    assert flatten({"loss": 0.5, "val": {"iou": 0.25}}, "train.") == {"train.loss": 0.5, "train.val.iou": 0.25}


def test_any_mapping_is_opened_and_an_empty_one_gives_nothing() -> None:
    nested = {"a": MappingProxyType({"b": OrderedDict(c=1)}), "empty": {}}
    assert flatten(nested) == {"a.b.c": 1}
