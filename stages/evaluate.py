"""Stage ``evaluate``: both models, the CAMs and the pseudo-masks scored on the test partition.

Every row scores what the pipeline itself would output at test time: the thresholded CAM, the refined
pseudo-mask and the trivial tissue baseline of a test tile count only where the classifier calls the tile
positive (its label is not known at test time), at the decision threshold ``train_classifier`` chose on the
validation split (the checkpoint's ``decision_threshold``; ``evaluate.threshold`` thresholds pixels).
Rows ending in ``_oracle_label`` gate by the true label instead, to show what the classifier's mistakes
cost. The segmenter's ``vs_pseudo`` reference is the pseudo-mask gated by the label (the paper's protocol).

Reads only test tiles. Writes ``metrics/evaluate.json`` (the names of ``../shared/PIPELINE.md``, plus the
segmenter's tile-level decisions and tile counts), ``metrics/roc.csv`` and ``metrics/confusion.csv`` for
``dvc plots``, figures under ``figures/evaluate/``, and one MLflow run holding all of them.

Started by ``torchrun`` (``torchrun --nproc-per-node=N -m stages.evaluate``), each process scores every
N-th test tile (each GPU its own, on GPUs) and rank 0 gathers the scored tiles, computes the metrics and
writes every output.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from weakseg.data.layout import partition, read_annotations
from weakseg.distributed import DistributedContext, gather_objects, run_distributed_stage, shard, unshard
from weakseg.evaluation import (
    EvaluateInputError,
    compute_metrics,
    figure_selection,
    tile_roc_curves,
    write_confusion_csv,
    write_roc_csv,
)
from weakseg.evaluation_figures import write_evaluation_figures
from weakseg.evaluation_inputs import EvaluationInputs, score_tiles
from weakseg.inference import InferenceError
from weakseg.io import atomic_directory, write_json
from weakseg.params import StageParams
from weakseg.stage import run_stage
from weakseg.tracking import stage_run

LOGGER = logging.getLogger(__name__)

NORMALIZED = Path("data/normalized")
INPUTS = EvaluationInputs(
    normalized=NORMALIZED,
    true_masks=Path("data/raw/masks"),
    cams=Path("data/cams"),
    pseudo_masks=Path("data/pseudo_masks"),
    classifier=Path("models/classifier.pt"),
    segmenter=Path("models/segmenter.pt"),
    cam_metrics=Path("metrics/cams.json"),
)
METRICS = Path("metrics/evaluate.json")
ROC = Path("metrics/roc.csv")
CONFUSION = Path("metrics/confusion.csv")
FIGURES = Path("figures/evaluate")


def run(params: StageParams) -> None:
    """Scores the test partition and writes metrics, plot data, figures and an MLflow run.

    Started by ``torchrun``, the test tiles are sharded over the processes (see the module docstring).
    """
    run_distributed_stage(
        "evaluate", params.evaluate.device, functools.partial(_evaluate, params), device_error=EvaluateInputError
    )


def _evaluate(params: StageParams, context: DistributedContext | None) -> None:
    """The stage's work in one process (``context`` ``None``) or in one rank of several."""
    settings = params.evaluate
    tiles = partition(read_annotations(NORMALIZED / "annotations.csv", params.data.positive_label), "test")
    if not tiles:
        raise EvaluateInputError(f"{NORMALIZED / 'annotations.csv'}: no tile in the test partition to evaluate")
    selected = figure_selection(tiles, settings.figure_tiles, settings.figure_seed)
    shown = {tile.name for tile in selected}
    try:
        if context is None or not context.enabled:
            scored, has_truth, head_threshold, classifier_threshold, joint_threshold = score_tiles(
                params, INPUTS, tiles, shown
            )
        else:
            # Each rank scores every world_size-th tile; rank 0 puts them back in order and goes on alone.
            share, has_truth, head_threshold, classifier_threshold, joint_threshold = score_tiles(
                params, INPUTS, shard(tiles, context), shown, context.device
            )
            shares = gather_objects(share, context)
            if not context.is_main:
                return
            scored = unshard(shares, len(tiles))
    except InferenceError as error:
        raise EvaluateInputError(str(error)) from None
    result = compute_metrics(
        scored,
        settings.threshold,
        settings.min_foreground_pixels,
        has_truth,
        head_threshold=head_threshold,
        classifier_threshold=classifier_threshold,
        joint_threshold=joint_threshold,
    )
    result["settings"]["segmenter_gate"] = settings.segmenter_gate
    roc_curves = tile_roc_curves(scored, result)
    by_name = {record.tile.name: record for record in scored}
    shown_records = [by_name[tile.name] for tile in selected]
    with atomic_directory(FIGURES) as folder:
        decision = float(result["classifier"]["threshold"])
        write_evaluation_figures(folder, shown_records, has_truth, settings.threshold, decision, roc_curves)
    write_roc_csv(ROC, roc_curves[0])
    write_confusion_csv(CONFUSION, scored, classifier_threshold, params.data.positive_label)
    METRICS.parent.mkdir(parents=True, exist_ok=True)
    write_json(METRICS, result)
    LOGGER.info(
        "classifier AUC %.3f, segmenter IoU vs pseudo %.3f%s",
        result["classifier"]["auc"],
        result["segmenter"]["vs_pseudo"]["iou"],
        f", vs truth {result['segmenter']['vs_truth']['iou']:.3f}" if has_truth else "",
    )
    with stage_run("evaluate", params.to_flat_dict()) as tracked:
        tracked.log_metrics(result)
        for path in (METRICS, ROC, CONFUSION):
            tracked.log_artifact(path, "metrics")
        for path in sorted(FIGURES.glob("*.png")):
            tracked.log_artifact(path, "figures")


if __name__ == "__main__":
    raise SystemExit(run_stage("evaluate", run))
