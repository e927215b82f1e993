"""Nested mappings as flat ``{"a.b.c": leaf}`` dictionaries (MLflow params and metrics, metric-name checks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested mapping under its dotted path: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``.

    Args:
        mapping: the nested mapping; any value that is not a mapping is a leaf.
        prefix: put before every path (``"train."`` gives ``"train.a.b"``).

    Returns:
        The leaves in the mapping's own order (depth first), keyed by ``prefix`` plus their dotted path.
    """
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
