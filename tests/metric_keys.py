"""The dotted metric names that ``metrics/evaluate.json`` must hold, and a check of a document against them.

The names come from the "Metric names" block of the pipeline contract (``../shared/PIPELINE.md``; the
copy below is used where the shared page is not beside the repository), plus the ``_oracle_label`` rows
that the evaluate stage writes beside the gated ones (the contract's naming rule for a variant that uses
the true label).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from weakseg.flatten import flatten

PIPELINE_MD = Path(__file__).resolve().parents[1].parent / "shared" / "PIPELINE.md"
FALLBACK_NAMES = """
classifier.{accuracy, balanced_accuracy, auc, sensitivity, specificity}
segmenter.vs_pseudo.{iou, miou, dice, iou_positive_mean}
segmenter.vs_truth.{iou, miou, dice, iou_positive_mean}
cam.vs_truth.{iou, dice}
pseudo.vs_truth.{iou, dice}
"""
ORACLE_LABEL_NAMES = """
cam_oracle_label.vs_truth.{iou, dice}
pseudo_oracle_label.vs_truth.{iou, dice}
baseline.tissue_if_label_positive_oracle_label.vs_truth.{iou, dice}
"""


def expand_names(text: str) -> list[str]:
    """Expands every ``prefix.{a, b}`` line of ``text`` into ``prefix.a``, ``prefix.b`` (comments ignored)."""
    names = []
    for prefix, keys in re.findall(r"^([\w.]+)\.\{([^}]*)\}", text, flags=re.MULTILINE):
        names += [f"{prefix}.{key.strip()}" for key in keys.split(",")]
    return names


def contract_names(pipeline_md: Path = PIPELINE_MD) -> list[str]:
    """The names of PIPELINE.md's "Metric names" block (the fallback copy where the file is absent)."""
    if not pipeline_md.is_file():
        return expand_names(FALLBACK_NAMES)
    block = pipeline_md.read_text().split("## Metric names", 1)[1].split("```", 2)[1]
    return expand_names(block)


def evaluate_metric_names(pipeline_md: Path = PIPELINE_MD) -> list[str]:
    """Every name ``metrics/evaluate.json`` must hold on a dataset with pixel truth."""
    return contract_names(pipeline_md) + expand_names(ORACLE_LABEL_NAMES)


def missing_metrics(document: Mapping[str, object], names: Iterable[str]) -> list[str]:
    """The ``names`` that are not a number (int or float, not bool) at their dotted path in ``document``."""
    flat = flatten(document)
    return [name for name in names if not isinstance(flat.get(name), int | float) or isinstance(flat.get(name), bool)]
