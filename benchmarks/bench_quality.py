"""Quality against pixel truth, three seeds a row: ``results/quality.json``, ``results/quality.md``, the README.

For the synthetic demo (``params.yaml``; each seed changes the data seed and the training seed) and the real
H&E set ``../shared/data/ebhi-hgin-polyp`` (``presets/ebhi-cpu.yaml``; each seed changes the training seed),
every method row is scored on the test partition against the true masks (pooled IoU, Dice, mIoU), one value
per seed (``../shared/PIPELINE.md``, "Quality table"). Rows:

- ``weakseg``: the default method (the dataset's preset as it stands);
- ``paper``: the paper's chain at the same CPU budget (the preset with ``presets/paper-mhist.yaml``'s
  ``cam`` and ``refine`` sections and its ``evaluate.segmenter_gate``, and the classifier trained on whole
  tiles, as the paper's is); a run whose params equal another row's is not run twice;
- ``fully_supervised``: the same preset with ``segmenter.targets: truth`` (the yardstick), its segmenter
  started from the whole-tile classifier's backbone as it was before the crop classifier;
- from each ``weakseg`` run's ``metrics/evaluate.json``: ``tissue_if_classified_positive`` (all tissue on
  tiles that run's classifier calls positive), ``tissue_if_label_positive_oracle_label``, and the ablation
  rows ``cam_thresholded`` and ``pseudo_masks`` (classifier-gated, as the pipeline would output them);
- ablations read from the trained runs' ``evaluate.json``: ``paper_classifier_gated`` (the paper's
  segmenter with the classification gate), ``weakseg_ungated`` (weakseg without its gate),
  ``weakseg_head_gated`` (weakseg gated by its own head instead) and ``weakseg_classifier_gated`` (by the
  classifier alone, the default before its gate took both models), beside ``tissue_if_classifier_and_head_positive``
  (all tissue on the tiles weakseg's gate passes);
- trained ablation rows (:data:`ABLATIONS`), the ladder from the paper's chain to the default, one
  component at a time: ``paper_without_crf``, the ignore band (``weakseg_cam_layer4``), the CAM on layer3
  (``weakseg_without_background_seeds``), background seeds (``weakseg_whole_tile_classifier``), the crop
  classifier (``weakseg_ungated``), its gate (``weakseg``); contrasts off the whole-tile row: the tile-label
  losses (``weakseg_with_tile_label_losses``), a fixed background share, and on the imbalanced variant no
  negative oversampling (``weakseg_without_negative_oversampling``). The demo's top of the ladder has two
  more steps: the crop classifier with its gate, a constant segmenter learning rate and the normal share
  measured below the validation negatives' median (``weakseg_constant_learning_rate``, its default before;
  EBHI's preset had one cycle already), then one cycle (``weakseg_median_normal_reference``), then the
  90th-percentile reference (``weakseg``). Off the default, on the demo and EBHI: the top 40 % of a positive
  tile's CAM as foreground instead of the top half (``weakseg_top_40_percent_foreground``).

``ebhi-hgin-polyp-imbalanced`` is EBHI with most negative *train* tiles dropped (10 positives to 1
negative, a seeded choice; :func:`make_imbalanced_variant`, links in the workspace, nothing copied into
the repository); its test partition is EBHI's, so its rows compare with EBHI's. ``ebhi-hgin-polyp-mostly-positive``
drops them in the test partition too (10 to 1 in both): a set whose test tiles are nearly all positive, where
the score is the lesion inside positive tiles and a classifier's missed positives, not false alarms.

Each (dataset, method, seed) runs ``dvc repro`` in one project copy per dataset under ``.bench/quality``
(git-ignored), so DVC's run cache restores every stage an earlier run already computed; a finished run's
scores are kept in ``runs.json`` there, and an interrupted benchmark resumes where it stopped. Only
committed code is measured (``git archive HEAD``). ``seconds`` is the sum of the row's seven stage times
as each stage logged them when it ran; a stage shared by several rows (the classifier, say) counts in each.
The run records are not in git, so the report keeps, from the committed ``results/quality.json``, every
dataset and row that has no finished run in the workspace (:func:`carry_over`): a fresh checkout re-runs one
row without losing the others.

The check at the end exits non-zero, naming the row, when the default method's mean IoU falls below the
classifier-gated trivial baseline's on a dataset, or the fully supervised reference's below 0.75 on EBHI.

    python -m benchmarks.bench_quality [--datasets demo ebhi-hgin-polyp ebhi-hgin-polyp-imbalanced
        ebhi-hgin-polyp-mostly-positive]
        [--seeds 0 1 2] [--methods weakseg ...] [--report-only]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from tools.project_copy import PROJECT_ROOT, dvc, make_project
from weakseg.data.layout import partition, read_annotations, write_annotations

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data" / "ebhi-hgin-polyp"
WORKSPACE = PROJECT_ROOT / ".bench" / "quality"
RESULTS = PROJECT_ROOT / "results"
README = PROJECT_ROOT / "README.md"
README_START, README_END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"
KEYS = ("iou", "dice", "miou")
FULLY_SUPERVISED_FLOOR = 0.75
# Rows read from a weakseg run's metrics/evaluate.json: (row, path in the file, what it uses).
DERIVED_ROWS = {
    "tissue_if_classified_positive": (
        "baseline.tissue_if_classified_positive.vs_truth",
        "tissue masks, classifier decisions",
    ),
    "tissue_if_label_positive_oracle_label": (
        "baseline.tissue_if_label_positive_oracle_label.vs_truth",
        "tissue masks, the TRUE test labels (an oracle)",
    ),
    "tissue_holes_filled_if_classified_positive": (
        "baseline.tissue_holes_filled_if_classified_positive.vs_truth",
        "tissue masks with their enclosed holes filled (evaluate.fill_holes' step), classifier decisions",
    ),
    "tissue_if_classifier_and_head_positive": (
        "baseline.tissue_if_classifier_and_head_positive.vs_truth",
        "tissue masks, the decisions of weakseg's gate (the lower of the classifier's and the segmenter head's "
        "probabilities at a cut chosen on validation)",
    ),
    "cam_thresholded": ("cam.vs_truth", "the classifier's CAM at the quantile, classifier decisions"),
    "pseudo_masks": ("pseudo.vs_truth", "weakseg's refined pseudo-masks (their foreground), classifier decisions"),
}
# Ablation rows read from a trained run's evaluate.json: (row, source run, path, what it uses).
VARIANT_ROWS = {
    "paper_classifier_gated": (
        "paper",
        "segmenter_classifier_gated.vs_truth",
        "the paper's segmenter, classifier-gated",
    ),
    "weakseg_ungated": (
        "weakseg",
        "segmenter_ungated.vs_truth",
        "ablation: weakseg without a gate (evaluate.segmenter_gate: none)",
    ),
    "weakseg_head_gated": (
        "weakseg",
        "segmenter_head_gated.vs_truth",
        "weakseg gated by the segmenter's own classification head (evaluate.segmenter_gate: head)",
    ),
    "weakseg_classifier_gated": (
        "weakseg",
        "segmenter_classifier_gated.vs_truth",
        "ablation: weakseg gated by the classifier alone (evaluate.segmenter_gate: classifier; the default before)",
    ),
}
TRAINED_ROWS = {
    "paper": "the paper's chain (CAM -> quantile -> morphology -> CRF -> DeepLabV3+), tile labels only",
    "paper_without_crf": "ablation: the paper's chain without DenseCRF",
    "weakseg": (
        "the default method (a balanced classifier trained on 64 px crops; as its gate, the lower of its probability "
        "and the segmenter head's at a cut chosen on validation, by balanced accuracy unless one class has under "
        "10 tiles there; as its CAM, that "
        "classifier's mean logit over the 32 px crops that hold each pixel; ignore"
        " band with background seeds of the normal share measured on its crops, below the validation negatives' "
        "90th percentile, and foreground above the seeds and a band of 20 % of the tissue; one-cycle segmenter; "
        "no CRF; scarce negatives repeated; the regions its mask encloses filled), tile labels only"
    ),
    "weakseg_grad_cam": (
        "ablation: weakseg_classifier_gated with the classifier's Smooth Grad-CAM++ on layer3 as its CAM instead "
        "of its mean crop logit (cam.method smoothgradcampp; the default before)"
    ),
    "weakseg_without_hole_filling": (
        "ablation: weakseg_grad_cam without filling the regions its mask encloses (evaluate.fill_holes false; the "
        "default before)"
    ),
    "weakseg_balanced_accuracy_gate": (
        "ablation: weakseg_without_hole_filling with the gate's cut (and the segmenter head's) always at the "
        "highest validation balanced accuracy, however few validation negatives there are "
        "(classifier.decision_rule and segmenter.decision_rule balanced_accuracy; the default before)"
    ),
    "weakseg_half_foreground": (
        "ablation: weakseg_balanced_accuracy_gate with the top half of a positive tile's tissue CAM as foreground"
        " instead of what lies above the seeds and the band (refine.threshold_quantile 0.5; the default before)"
    ),
    "weakseg_whole_tile_classifier": (
        "ablation: weakseg with its classifier trained on whole tiles, no gate (weakseg's default before the crop"
        " classifier)"
    ),
    "weakseg_with_tile_label_losses": "ablation: weakseg + multiple-instance and size-constraint losses",
    "weakseg_cam_layer4": (
        "ablation: weakseg without background seeds, CAM on layer4 (the paper's layer; weakseg's default before "
        "this ladder)"
    ),
    "weakseg_without_background_seeds": (
        "ablation: weakseg without background seeds in positive tiles (refine.background_quantile 0: the whole "
        "band below the CAM cut ignored)"
    ),
    "weakseg_with_background_seeds": (
        "ablation: weakseg with a fixed background share instead of the estimate (the lowest 20 % of a positive "
        "tile's CAM; foreground: the top 40 %)"
    ),
    "weakseg_top_40_percent_foreground": (
        "contrast: weakseg_half_foreground with the top 40 % of a positive tile's tissue CAM as foreground "
        "instead of the top half (refine.threshold_quantile 0.6)"
    ),
    "weakseg_without_negative_oversampling": "ablation: weakseg without repeating the scarce negative tiles",
    "weakseg_constant_learning_rate": (
        "ablation: weakseg_median_normal_reference with a constant segmenter learning rate instead of one cycle "
        "(the demo's default before these two steps)"
    ),
    "weakseg_median_normal_reference": (
        "ablation: weakseg_half_foreground with the normal share measured below the validation negatives' median "
        "instead of their 90th percentile (the default before)"
    ),
    "fully_supervised": "the same segmenter trained on the TRUE train masks (the yardstick)",
    "fully_supervised_with_hole_filling": "fully_supervised with weakseg's hole filling (evaluate.fill_holes true)",
}
# Trained ablation rows: (the row it changes, the dotted params it sets).
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "paper_without_crf": ("paper", {"refine.crf.enabled": False}),
    # The rows below the crop classifier in the ladder keep the whole-tile classifier, one change at a time.
    "weakseg_cam_layer4": (
        "weakseg_whole_tile_classifier",
        {"cam.target_layer": "layer4", "refine.background_quantile": 0.0},
    ),
    "weakseg_without_background_seeds": ("weakseg_whole_tile_classifier", {"refine.background_quantile": 0.0}),
    "weakseg_with_background_seeds": (
        "weakseg_whole_tile_classifier",
        {"refine.background_quantile": 0.2, "refine.threshold_quantile": 0.6},
    ),
    "weakseg_without_negative_oversampling": (
        "weakseg_whole_tile_classifier",
        {"segmenter.curriculum.oversample_negatives": False},
    ),
    # The default before the CAM was the crop classifier's mean crop logit (every row below it keeps the
    # Grad-CAM and the classifier's gate, as measured).
    "weakseg_grad_cam": ("weakseg", {"cam.method": "smoothgradcampp", "evaluate.segmenter_gate": "classifier"}),
    # The default before the mask's enclosed holes were filled (every row below it keeps them, as measured).
    "weakseg_without_hole_filling": ("weakseg_grad_cam", {"evaluate.fill_holes": False}),
    # The yardstick with the same step, so the gap to it is not the step's.
    "fully_supervised_with_hole_filling": ("fully_supervised", {"evaluate.fill_holes": True}),
    # The default before the gate's cut was placed by the abundant class where the other is scarce.
    "weakseg_balanced_accuracy_gate": (
        "weakseg_without_hole_filling",
        {"classifier.decision_rule": "balanced_accuracy", "segmenter.decision_rule": "balanced_accuracy"},
    ),
    # The default before the foreground was placed above the seeds: the top half of the tissue CAM.
    "weakseg_half_foreground": ("weakseg_balanced_accuracy_gate", {"refine.threshold_quantile": 0.5}),
    # A contrast off it: a smaller foreground, which the demo's smaller lesions favour and EBHI's not.
    "weakseg_top_40_percent_foreground": ("weakseg_half_foreground", {"refine.threshold_quantile": 0.6}),
    # The demo's two steps before the foreground's: its default of two stops before, then the one-cycle
    # schedule, then the 90th-percentile reference (weakseg_half_foreground).
    "weakseg_median_normal_reference": ("weakseg_half_foreground", {"cam.normal_reference_quantile": 0.5}),
    "weakseg_constant_learning_rate": ("weakseg_median_normal_reference", {"segmenter.lr_schedule": "constant"}),
    "weakseg_with_tile_label_losses": (
        "weakseg_whole_tile_classifier",
        {
            "segmenter.loss.multiple_instance": 0.5,
            "segmenter.loss.multiple_instance_top_fraction": 0.2,
            "segmenter.loss.size": 1.0,
            "segmenter.loss.size_lower": 0.3,
            "segmenter.loss.size_upper": 1.0,
        },
    ),
}
# Which trained rows each dataset runs: the whole ladder on the demo and EBHI (the tile-label losses, the
# median normal reference and the constant learning rate on the demo only); the imbalanced variant tests the
# default's robustness only.
LADDER = (
    "weakseg",
    "weakseg_grad_cam",
    "weakseg_without_hole_filling",
    "weakseg_half_foreground",
    "weakseg_whole_tile_classifier",
    "fully_supervised",
    "paper",
    "paper_without_crf",
    "weakseg_cam_layer4",
    "weakseg_without_background_seeds",
    "weakseg_with_background_seeds",
    "weakseg_top_40_percent_foreground",
    "fully_supervised_with_hole_filling",
)
DATASET_METHODS = {
    "demo": (
        *LADDER,
        "weakseg_median_normal_reference",
        "weakseg_constant_learning_rate",
        "weakseg_with_tile_label_losses",
    ),
    "ebhi-hgin-polyp": LADDER,
    # weakseg_balanced_accuracy_gate only where a validation class has under 10 tiles: on EBHI and the demo
    # both have more, the rule is balanced accuracy either way, and the row would be weakseg's run again.
    "ebhi-hgin-polyp-imbalanced": (
        "weakseg",
        "weakseg_grad_cam",
        "weakseg_without_hole_filling",
        "weakseg_balanced_accuracy_gate",
        "weakseg_half_foreground",
        "weakseg_whole_tile_classifier",
        "weakseg_cam_layer4",
        "weakseg_without_negative_oversampling",
        "fully_supervised",
        "fully_supervised_with_hole_filling",
    ),
    "ebhi-hgin-polyp-mostly-positive": (
        "weakseg",
        "weakseg_grad_cam",
        "weakseg_without_hole_filling",
        "weakseg_balanced_accuracy_gate",
        "weakseg_half_foreground",
        "weakseg_whole_tile_classifier",
        "fully_supervised",
        "fully_supervised_with_hole_filling",
    ),
}
# classifier.epochs of the whole-tile classifier (the presets' budget before crops), per preset.
WHOLE_TILE_EPOCHS = {"demo": 20, "ebhi": 6}
IMBALANCED_RATIO = 10  # positive tiles per negative tile kept in a partition of the imbalanced variants
# The variants made from EBHI: where each lives, and the partitions whose negatives it thins.
IMBALANCED_VARIANTS = {
    "ebhi-hgin-polyp-imbalanced": ("train",),
    "ebhi-hgin-polyp-mostly-positive": ("train", "test"),
}


def variant_data(dataset: str) -> Path:
    """Where the benchmark makes an imbalanced variant of EBHI (in its git-ignored workspace)."""
    return WORKSPACE / dataset / "data"


ROW_ORDER = [
    "tissue_if_classified_positive",
    "tissue_if_label_positive_oracle_label",
    "tissue_holes_filled_if_classified_positive",
    "tissue_if_classifier_and_head_positive",
    "cam_thresholded",
    "pseudo_masks",
    "paper",
    "paper_classifier_gated",
    "paper_without_crf",
    "weakseg",
    "weakseg_ungated",
    "weakseg_head_gated",
    "weakseg_classifier_gated",
    "weakseg_grad_cam",
    "weakseg_without_hole_filling",
    "weakseg_balanced_accuracy_gate",
    "weakseg_half_foreground",
    "weakseg_whole_tile_classifier",
    "weakseg_cam_layer4",
    "weakseg_without_background_seeds",
    "weakseg_with_background_seeds",
    "weakseg_top_40_percent_foreground",
    "weakseg_with_tile_label_losses",
    "weakseg_without_negative_oversampling",
    "weakseg_median_normal_reference",
    "weakseg_constant_learning_rate",
    "fully_supervised",
    "fully_supervised_with_hole_filling",
]


def _set(params: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        params = params.setdefault(part, {})
    params[last] = value


def dataset_params(dataset: str, seed: int) -> dict[str, Any]:
    """The default method's params for one dataset and seed."""
    if dataset == "demo":
        params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
        _set(params, "data.synthetic.seed", seed)
    elif dataset == "ebhi-hgin-polyp":
        params = yaml.safe_load((PROJECT_ROOT / "presets" / "ebhi-cpu.yaml").read_text())
        _set(params, "data.folder.path", str(SHARED_DATA))
    elif dataset in IMBALANCED_VARIANTS:
        params = yaml.safe_load((PROJECT_ROOT / "presets" / "ebhi-cpu.yaml").read_text())
        _set(params, "data.folder.path", str(variant_data(dataset)))
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    params["seed"] = seed
    return params


def whole_tile_classifier(params: dict[str, Any], dataset: str) -> None:
    """Sets ``params``' classifier to whole tiles, at the budget it had before crops."""
    _set(params, "classifier.crop_size", None)
    _set(params, "classifier.crops_per_tile", 1)
    _set(params, "classifier.epochs", WHOLE_TILE_EPOCHS["demo" if dataset == "demo" else "ebhi"])


def method_params(dataset: str, method: str, seed: int) -> dict[str, Any]:
    """The params of one trained row."""
    params = dataset_params(dataset, seed)
    if method == "paper":
        # The paper's chain keeps the paper's classifier: whole tiles.
        paper = yaml.safe_load((PROJECT_ROOT / "presets" / "paper-mhist.yaml").read_text())
        params["cam"], params["refine"] = paper["cam"], paper["refine"]
        params["evaluate"]["segmenter_gate"] = paper["evaluate"]["segmenter_gate"]
        params["evaluate"]["fill_holes"] = paper["evaluate"]["fill_holes"]
        params["classifier"]["decision_rule"] = paper["classifier"]["decision_rule"]
        params["segmenter"]["decision_rule"] = paper["segmenter"]["decision_rule"]
        whole_tile_classifier(params, dataset)
    elif method == "fully_supervised":
        # The yardstick's segmenter starts from the same whole-tile classifier's backbone as before.
        # Below the foreground's step in the ladder, as measured (its pseudo-masks are not used).
        params = method_params(dataset, "weakseg_half_foreground", seed)
        _set(params, "segmenter.targets", "truth")
        whole_tile_classifier(params, dataset)
        # Never gated: the yardstick is the segmenter's own masks (a whole-tile classifier's gate would drop
        # positive tiles it misses).
        _set(params, "evaluate.segmenter_gate", "none")
    elif method == "weakseg_whole_tile_classifier":
        # Below the foreground's step in the ladder: the top half, as these rows were measured.
        params = method_params(dataset, "weakseg_half_foreground", seed)
        whole_tile_classifier(params, dataset)
        _set(params, "evaluate.segmenter_gate", "none")
    elif method in ABLATIONS:
        base, changes = ABLATIONS[method]
        params = method_params(dataset, base, seed)
        for dotted, value in changes.items():
            _set(params, dotted, value)
    elif method != "weakseg":
        raise ValueError(f"unknown method {method!r}")
    return params


def make_imbalanced_variant(
    source: Path,
    destination: Path,
    positive_label: str,
    ratio: int = IMBALANCED_RATIO,
    seed: int = 0,
    partitions: Sequence[str] = ("train",),
) -> Path:
    """A copy of ``source`` (MHIST layout) keeping, in each of ``partitions``, ``1 / ratio`` as many negative
    tiles as positive ones (at least one).

    Images and masks are symbolic links into ``source``; ``annotations.csv`` is rewritten with the kept
    rows in their original order. The negatives kept are a seeded choice; the other partitions' tiles are
    all kept. Rebuilt only when missing, and written to a temporary folder first, so a crash leaves nothing
    half made.
    """
    if (destination / "annotations.csv").is_file():
        return destination
    tiles = read_annotations(source / "annotations.csv", positive_label)
    choose = random.Random(seed)
    keep: set[str] = set()
    for name in partitions:
        members = partition(tiles, name)
        positives = sum(tile.positive for tile in members)
        negatives = [tile.name for tile in members if not tile.positive]
        keep.update(choose.sample(negatives, min(len(negatives), max(1, positives // ratio))))
    kept = [tile for tile in tiles if tile.partition not in partitions or tile.positive or tile.name in keep]
    temporary = destination.with_name(destination.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for folder in ("images", "masks"):
        if (source / folder).is_dir():
            (temporary / folder).mkdir()
            for tile in kept:
                (temporary / folder / tile.name).symlink_to((source / folder / tile.name).resolve())
    write_annotations(temporary / "annotations.csv", kept)
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(temporary, destination)
    return destination


def _scores(metrics: dict[str, Any], dotted: str) -> dict[str, float] | None:
    """The IoU, Dice and mIoU at ``dotted`` in an evaluate.json (None where the run did not write it)."""
    value: Any = metrics
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return {key: float(value[key]) for key in KEYS}


def stage_seconds(output: str) -> dict[str, float]:
    """Each stage's own wall time, from the ``<stage> INFO finished in N s`` lines the stages log."""
    return {stage: float(seconds) for stage, seconds in re.findall(r" (\w+) INFO finished in ([\d.]+) s", output)}


def run_one(project: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Writes ``params`` into the project, reproduces it, and returns its test metrics and stage times.

    The row's ``seconds`` is the sum of its stage times (:func:`merged_stage_seconds`), not this call's wall
    time, which leaves out the stages DVC restored from its run cache.
    """
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = dvc("repro", cwd=project)
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    return {"stage_seconds": stage_seconds(result.stdout + result.stderr), "metrics": metrics}


CODE = ("weakseg", "stages", "dvc.yaml")


def sync_code(project: Path) -> str:
    """Puts the pipeline's committed code (``HEAD``) into the benchmark's project; returns its fingerprint.

    Only committed code is measured, so work in progress in the checkout never leaks into a result, and
    the fingerprint (git's tree hashes) names what ran. A finished run counts only for the code it ran
    with; DVC re-runs just the stages whose code changed and restores the rest from its run cache.
    """
    import io
    import subprocess
    import tarfile

    trees = subprocess.run(
        ["git", "rev-parse", *(f"HEAD:{name}" for name in CODE)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", "HEAD", *CODE], cwd=PROJECT_ROOT, capture_output=True, check=True
    ).stdout
    for name in CODE:
        target = project / name
        if target.is_dir():
            shutil.rmtree(target)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(project, filter="data")
    return hashlib.sha256(" ".join(trees).encode()).hexdigest()[:16]


def merged_stage_seconds(runs: dict[str, Any], key: str, seconds: dict[str, float]) -> dict[str, float]:
    """The row's seven stage times: those that ran now, the rest from the run that computed them.

    Stages restored from DVC's run cache take no time now; their time is the one recorded when they ran
    (the same row's earlier record, else the same seed's ``weakseg`` row, which runs first).
    """
    dataset, _, seed = key.split("/")
    merged = dict(seconds)
    for source in (runs.get(key), runs.get(f"{dataset}/weakseg/{seed}")):
        for stage, value in ((source or {}).get("stage_seconds") or {}).items():
            merged.setdefault(stage, value)
    return merged


def _load_runs(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_runs(path: Path, runs: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(runs, indent=1, sort_keys=True))
    os.replace(temporary, path)


def run_dataset(
    dataset: str,
    seeds: Sequence[int],
    runs: dict[str, Any],
    save: Callable[[], None],
    workspace: Path = WORKSPACE,
    methods: Sequence[str] | None = None,
) -> None:
    """Runs the trained rows of one dataset (``methods``, default all) for each seed, skipping finished runs."""
    if dataset in IMBALANCED_VARIANTS:
        make_imbalanced_variant(SHARED_DATA, variant_data(dataset), "HGIN", partitions=IMBALANCED_VARIANTS[dataset])
    project = workspace / dataset / "project"
    if not (project / ".dvc").is_dir():
        shutil.rmtree(project, ignore_errors=True)
        make_project(project, PROJECT_ROOT / "params.yaml")
    code = sync_code(project)
    for seed in seeds:
        for method in DATASET_METHODS[dataset]:
            if methods is not None and method not in methods:
                continue
            key = f"{dataset}/{method}/{seed}"
            params = method_params(dataset, method, seed)
            if key in runs and runs[key].get("params") == params and runs[key].get("code") == code:
                continue
            twin = next(
                (
                    name
                    for name, run in runs.items()
                    if name.startswith(f"{dataset}/") and run.get("params") == params and run.get("code") == code
                ),
                None,
            )
            if twin is not None:
                runs[key] = {**runs[twin], "same_as": twin}
            else:
                print(f"== {key}", file=sys.stderr, flush=True)
                record = run_one(project, params)
                record["stage_seconds"] = merged_stage_seconds(runs, key, record["stage_seconds"])
                record["seconds"] = round(sum(record["stage_seconds"].values()), 1)
                runs[key] = {"params": params, "code": code, **record}
            save()


def quality_table(runs: dict[str, Any], datasets: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """``results/quality.json`` from the finished runs: per dataset and row, one value per seed."""
    table: dict[str, Any] = {}
    for dataset in datasets:
        methods: dict[str, dict[str, list[float]]] = {}
        done = [seed for seed in seeds if f"{dataset}/weakseg/{seed}" in runs]
        for seed in done:
            weak = runs[f"{dataset}/weakseg/{seed}"]
            for row, (path, _) in DERIVED_ROWS.items():
                entry = methods.setdefault(row, {key: [] for key in (*KEYS, "seconds")})
                for key, value in (_scores(weak["metrics"], path) or {}).items():
                    entry[key].append(round(value, 4))
                entry["seconds"].append(weak["seconds"])
            sources = [(row, row, "segmenter.vs_truth") for row in TRAINED_ROWS if row in DATASET_METHODS[dataset]]
            sources += [(row, source, path) for row, (source, path, _) in VARIANT_ROWS.items()]
            for row, source, path in sources:
                run = runs.get(f"{dataset}/{source}/{seed}")
                if run is None:
                    continue
                scores = _scores(run["metrics"], path)
                if scores is None:
                    continue
                entry = methods.setdefault(row, {key: [] for key in (*KEYS, "seconds")})
                for key, value in scores.items():
                    entry[key].append(round(value, 4))
                entry["seconds"].append(run["seconds"])
        table[dataset] = {"seeds": done, "methods": {row: methods[row] for row in ROW_ORDER if row in methods}}
    return table


def carry_over(table: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """``table`` completed from an earlier ``results/quality.json``'s ``datasets`` (``previous``).

    The run records live in the git-ignored workspace, so a fresh checkout has none; the committed results
    are then the only record of the rows it does not re-run. A dataset not in ``table`` is kept whole; in a
    dataset of both, a row with no finished run now is kept as it was, and rows with runs are replaced.
    Rows keep the row order (:data:`ROW_ORDER`); the datasets keep ``previous``'s order, new ones last.
    """
    merged: dict[str, Any] = {}
    for dataset in [*previous, *(name for name in table if name not in previous)]:
        if dataset not in table:
            merged[dataset] = previous[dataset]
            continue
        section = table[dataset]
        earlier = previous.get(dataset, {}).get("methods", {})
        methods = {**{row: values for row, values in earlier.items() if row not in section["methods"]}}
        methods |= section["methods"]
        order = {row: index for index, row in enumerate(ROW_ORDER)}
        merged[dataset] = {
            "seeds": section["seeds"] or previous.get(dataset, {}).get("seeds", []),
            "methods": dict(sorted(methods.items(), key=lambda item: order.get(item[0], len(order)))),
        }
    return merged


def regressions(table: dict[str, Any]) -> list[str]:
    """The rows that break the quality floor, named (an empty list when all hold)."""
    failures = []
    for dataset, section in table.items():
        methods = section["methods"]
        if "weakseg" in methods and "tissue_if_classified_positive" in methods:
            weak = statistics.mean(methods["weakseg"]["iou"])
            trivial = statistics.mean(methods["tissue_if_classified_positive"]["iou"])
            if weak < trivial:
                failures.append(
                    f"{dataset}: weakseg IoU {weak:.3f} is below tissue_if_classified_positive {trivial:.3f}"
                )
        if dataset == "ebhi-hgin-polyp" and "fully_supervised" in methods:
            full = statistics.mean(methods["fully_supervised"]["iou"])
            if full < FULLY_SUPERVISED_FLOOR:
                failures.append(f"{dataset}: fully_supervised IoU {full:.3f} is below {FULLY_SUPERVISED_FLOOR}")
    return failures


def _mean_sd(values: Sequence[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def to_markdown(report: dict[str, Any]) -> str:
    """The README's Results table: mean ± sd over the seeds, and what each row uses."""
    machine = report["machine"]
    lines = [
        f"Test partition, against the true masks, pooled over every test pixel (negatives included); mean ± sd "
        f"over the seeds listed. Measured by `make bench-quality` on {machine['cpu_cores']} CPU cores "
        f"({machine['device']}, torch {machine['torch']}, {machine['date']}). `seconds`: the sum of the row's "
        "seven stage times (a stage shared by several rows, such as the classifier, counts in each).",
        "",
    ]
    uses = {row: what for row, (_, what) in DERIVED_ROWS.items()} | TRAINED_ROWS
    uses |= {row: what for row, (_, _, what) in VARIANT_ROWS.items()}
    for dataset, section in report["datasets"].items():
        lines += [f"**{dataset}** (seeds {', '.join(map(str, section['seeds'])) or 'none yet'})", ""]
        lines += ["| method | uses | IoU | Dice | mIoU | seconds |", "| --- | --- | --- | --- | --- | --- |"]
        for row, values in section["methods"].items():
            seconds = f"{statistics.mean(values['seconds']):.0f}" if values["seconds"] else "—"
            cells = " | ".join(_mean_sd(values[key]) for key in KEYS)
            lines.append(f"| `{row}` | {uses[row]} | {cells} | {seconds} |")
        lines.append("")
    failures = report.get("regressions", [])
    lines.append("Quality check: " + ("**fails**: " + "; ".join(failures) if failures else "passes") + ".")
    return "\n".join(lines) + "\n"


def update_readme(markdown: str, readme: Path = README) -> bool:
    """Replaces the README's quality table between its markers; False when the markers are missing."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{markdown}{README_END}{tail}")
    return True


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu_cores": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Runs (or resumes) the benchmark, writes the results and the README table, and checks the floor."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=list(DATASET_METHODS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--methods", nargs="*", default=None, help="run only these trained rows (the table keeps every finished run)"
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite the results from the finished runs")
    arguments = parser.parse_args(argv)
    datasets = [name for name in arguments.datasets if not name.startswith("ebhi-hgin-polyp") or SHARED_DATA.is_dir()]
    runs_file = WORKSPACE / "runs.json"
    runs = _load_runs(runs_file)

    def report() -> list[str]:
        table = quality_table(runs, datasets, arguments.seeds)
        if (RESULTS / "quality.json").is_file():
            table = carry_over(table, json.loads((RESULTS / "quality.json").read_text()).get("datasets", {}))
        failures = regressions(table)
        result = {"machine": machine(), "datasets": table, "regressions": failures}
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
        markdown = to_markdown(result)
        (RESULTS / "quality.md").write_text(markdown)
        update_readme(markdown)
        return failures

    def save_and_report() -> None:
        _save_runs(runs_file, runs)
        report()

    if not arguments.report_only:
        for dataset in datasets:
            run_dataset(dataset, arguments.seeds, runs, save_and_report, methods=arguments.methods)
    failures = report()
    for failure in failures:
        print(f"quality check failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
