"""The metric-name check that the integration test applies to ``metrics/evaluate.json``, on hand-made dicts."""

from __future__ import annotations

import copy
from pathlib import Path

from tests.metric_keys import (
    FALLBACK_NAMES,
    PIPELINE_MD,
    contract_names,
    evaluate_metric_names,
    expand_names,
    flatten,
    missing_metrics,
)


def _complete_document() -> dict:
    """A document holding every required name as a number, nested as the evaluate stage writes it."""
    document: dict = {}
    for index, name in enumerate(evaluate_metric_names()):
        *parents, leaf = name.split(".")
        section = document
        for part in parents:
            section = section.setdefault(part, {})
        section[leaf] = 0.5 if index % 2 else 1
    return document


def test_names_expand_the_contract_block_and_the_oracle_rows() -> None:
    names = evaluate_metric_names()
    for name in [
        "classifier.balanced_accuracy",
        "segmenter.vs_pseudo.iou_positive_mean",
        "segmenter.vs_truth.miou",
        "cam.vs_truth.dice",
        "pseudo.vs_truth.iou",
        "cam_oracle_label.vs_truth.iou",
        "pseudo_oracle_label.vs_truth.dice",
        "baseline.tissue_if_label_positive_oracle_label.vs_truth.iou",
    ]:
        assert name in names, name
    assert len(names) == len(set(names)) == 5 + 4 + 4 + 2 + 2 + 6
    assert all(" " not in name and "{" not in name and not name.endswith(".") for name in names)


def test_fallback_copy_is_used_without_the_shared_page_and_matches_it(tmp_path: Path) -> None:
    assert contract_names(tmp_path / "absent.md") == expand_names(FALLBACK_NAMES)
    if PIPELINE_MD.is_file():  # the copy stays true to the contract where the contract can be read
        assert contract_names(PIPELINE_MD) == expand_names(FALLBACK_NAMES)


def test_expand_names_reads_prefix_braces_lines_only() -> None:
    text = "a.b.{x, y}   # comment\nnot a line\nc.{z}\n"
    assert expand_names(text) == ["a.b.x", "a.b.y", "c.z"]


def test_flatten_gives_dotted_leaves() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": 2.0}}, "e": "x"}) == {"a.b": 1, "a.c.d": 2.0, "e": "x"}


def test_a_complete_document_passes() -> None:
    assert missing_metrics(_complete_document(), evaluate_metric_names()) == []


def test_a_missing_key_fails_by_its_dotted_name() -> None:
    document = _complete_document()
    del document["segmenter"]["vs_truth"]["iou_positive_mean"]
    assert missing_metrics(document, evaluate_metric_names()) == ["segmenter.vs_truth.iou_positive_mean"]


def test_a_name_that_is_only_a_substring_or_a_section_fails() -> None:
    # The old check searched names anywhere in the JSON text: these all contain the words, in the wrong place.
    document = _complete_document()
    renamed = copy.deepcopy(document)
    renamed["classifier"]["roc_auc"] = renamed["classifier"].pop("auc")
    assert missing_metrics(renamed, ["classifier.auc"]) == ["classifier.auc"]
    moved = copy.deepcopy(document)
    moved["segmenter"]["vs_truth"] = {"summary": moved["segmenter"]["vs_truth"]}  # one level too deep
    assert "segmenter.vs_truth.iou" in missing_metrics(moved, evaluate_metric_names())
    gone = copy.deepcopy(document)
    del gone["cam_oracle_label"]
    expected = ["cam_oracle_label.vs_truth.iou", "cam_oracle_label.vs_truth.dice"]
    assert missing_metrics(gone, evaluate_metric_names()) == expected


def test_a_value_that_is_not_a_number_fails() -> None:
    for value in ({"iou": 0.3}, "0.3", None, True, [0.3]):
        document = _complete_document()
        document["pseudo"]["vs_truth"]["iou"] = value
        assert missing_metrics(document, evaluate_metric_names()) == ["pseudo.vs_truth.iou"], value
