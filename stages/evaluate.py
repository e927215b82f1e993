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

import csv
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from weakseg import figures, metrics
from weakseg.data.layout import Tile, partition, read_annotations
from weakseg.errors import UserInputError
from weakseg.inference import InferenceError, load_model, make_forward, predict_images
from weakseg.io import atomic_directory, atomic_path, read_gray, read_mask, read_pseudo_mask, read_rgb, write_json
from weakseg.params import StageParams
from weakseg.refine import threshold_cam
from weakseg.stage import run_stage
from weakseg.tracking import stage_run
from weakseg.training.common import select_device
from weakseg.training.distributed import (
    DistributedContext,
    gather_objects,
    init_distributed,
    launched_by_torchrun,
    leaving_process_group,
    shard,
    unshard,
)

LOGGER = logging.getLogger(__name__)

NORMALIZED = Path("data/normalized")
TRUE_MASKS = Path("data/raw/masks")
CAMS = Path("data/cams")
PSEUDO_MASKS = Path("data/pseudo_masks")
CLASSIFIER = Path("models/classifier.pt")
SEGMENTER = Path("models/segmenter.pt")
METRICS = Path("metrics/evaluate.json")
ROC = Path("metrics/roc.csv")
CONFUSION = Path("metrics/confusion.csv")
FIGURES = Path("figures/evaluate")
ERROR_LEGEND = "white: true positive, red: false positive, blue: false negative, black: true negative"


class EvaluateInputError(UserInputError):
    """Raised when the evaluate stage's inputs do not fit together."""


@dataclass
class TestTile:
    """One scored test tile: its masks, and (for figure tiles only) its image and probability map.

    ``pseudo`` and ``cam_mask`` are ungated (refined and thresholded whatever the tile's label);
    :func:`compute_metrics` gates them by the classifier or by the label.
    """

    tile: Tile
    prediction: np.ndarray  # the segmenter's mask as the pipeline outputs it (after evaluate.segmenter_gate)
    pseudo: np.ndarray
    cam_mask: np.ndarray
    tissue: np.ndarray
    truth: np.ndarray | None
    classifier_probability: float
    head_probability: float
    prediction_ungated: np.ndarray | None = None  # the mask before the gate (None: no gate, the same)
    image: np.ndarray | None = None
    probability: np.ndarray | None = None


def _check_shape(path: Path, array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if array.shape[:2] != shape:
        raise EvaluateInputError(f"{path}: size {array.shape[1]}x{array.shape[0]} differs from its tile's {shape[1]}x{shape[0]}")
    return array


def figure_selection(tiles: Sequence[Tile], per_class: int, seed: int) -> list[Tile]:
    """Up to ``per_class`` positive then ``per_class`` negative tiles, chosen by a seeded draw over sorted names."""
    rng = np.random.default_rng(seed)
    chosen: list[Tile] = []
    for positive in (True, False):
        members = sorted((tile for tile in tiles if tile.positive == positive), key=lambda tile: tile.name)
        picks = sorted(rng.permutation(len(members))[:per_class].tolist())
        chosen.extend(members[index] for index in picks)
    return chosen


def _score_tiles(
    params: StageParams, tiles: list[Tile], shown: set[str], device: torch.device | None = None
) -> tuple[list[TestTile], bool, float]:
    """Runs both models over the test tiles and gathers every mask the metrics need.

    ``device`` (a distributed rank's GPU) replaces ``evaluate.device`` when given. Returns the scored
    tiles, whether true masks exist, and the tile thresholds of the segmenter head and of the classifier
    from their checkpoints.
    """
    settings = params.evaluate
    if device is None:
        try:
            device = select_device(settings.device)
        except RuntimeError as error:
            raise EvaluateInputError(f"evaluate.device: {error}") from None
    classifier = load_model(CLASSIFIER, "classifier", device)
    segmenter = load_model(SEGMENTER, "segmenter", device)
    for model in (classifier, segmenter):
        if model.positive_label is not None and model.positive_label != params.data.positive_label:
            raise EvaluateInputError(
                f"{model.path}: trained for positive label {model.positive_label!r}, but data.positive_label "
                f"is {params.data.positive_label!r}; re-run the pipeline"
            )
    has_truth = TRUE_MASKS.is_dir()
    forward = make_forward(segmenter.model, classifier.model)
    classifier_threshold = classifier.decision_threshold

    def images() -> Iterator[tuple[int, np.ndarray]]:
        for index, tile in enumerate(tiles):
            yield index, read_rgb(NORMALIZED / "images" / tile.name)

    scored: list[TestTile] = []
    predictions = predict_images(images(), forward, segmenter.preprocessing, device, settings.batch_size)
    for index, prediction in tqdm(predictions, total=len(tiles), desc="evaluate: test tiles", leave=False):
        tile = tiles[index]
        if prediction.probability is None:
            raise EvaluateInputError(f"{SEGMENTER}: the model gave no probability map for {tile.name}")
        shape = prediction.probability.shape
        tissue = _check_shape(NORMALIZED / "tissue" / tile.name, read_mask(NORMALIZED / "tissue" / tile.name), shape)
        cam = _check_shape(CAMS / tile.name, read_gray(CAMS / tile.name), shape)
        # The foreground only: a pseudo-mask's ignored band (128) is not lesion.
        pseudo = _check_shape(PSEUDO_MASKS / tile.name, read_pseudo_mask(PSEUDO_MASKS / tile.name)[0], shape)
        truth = _check_shape(TRUE_MASKS / tile.name, read_mask(TRUE_MASKS / tile.name), shape) if has_truth else None
        predicted = prediction.probability >= settings.threshold
        if params.refine.restrict_to_tissue:
            # The same post-processing as `predict`: lesion pixels are tissue by definition.
            predicted &= tissue
        cam_mask = threshold_cam(cam, tissue, params.refine.threshold_quantile, params.refine.restrict_to_tissue)
        ungated = None
        called_negative = prediction.tile_probabilities["classifier"] < classifier_threshold
        if settings.segmenter_gate == "classifier" and called_negative:
            ungated, predicted = predicted, np.zeros_like(predicted)
        record = TestTile(
            tile=tile,
            prediction=predicted,
            prediction_ungated=ungated,
            pseudo=pseudo,
            cam_mask=cam_mask,
            tissue=tissue,
            truth=truth,
            classifier_probability=prediction.tile_probabilities["classifier"],
            head_probability=prediction.tile_probabilities["head"],
        )
        if tile.name in shown:
            record.image = read_rgb(NORMALIZED / "images" / tile.name)
            record.probability = prediction.probability
        scored.append(record)
    return scored, has_truth, segmenter.head_threshold, classifier_threshold


def gate(masks: Sequence[np.ndarray], keep: Sequence[bool]) -> list[np.ndarray]:
    """Each mask where its tile is kept, an empty mask elsewhere."""
    return [mask if kept else np.zeros_like(mask) for mask, kept in zip(masks, keep, strict=True)]


def compute_metrics(
    scored: Sequence[TestTile],
    threshold: float,
    min_foreground_pixels: int,
    has_truth: bool,
    head_threshold: float | None = None,
    classifier_threshold: float | None = None,
) -> dict[str, Any]:
    """Every number of ``metrics/evaluate.json`` from the scored tiles.

    ``threshold`` is the pixel threshold. ``classifier_threshold`` is the classifier's decision threshold
    (its checkpoint's; ``threshold`` if None): a tile the classifier calls negative gets empty CAM,
    pseudo-mask and baseline masks in the fair rows. ``head_threshold`` is the segmenter head's tile
    threshold (its checkpoint's; ``threshold`` if None).
    """
    labels = [record.tile.positive for record in scored]
    classifier_cut = threshold if classifier_threshold is None else float(classifier_threshold)
    classified_positive = [record.classifier_probability >= classifier_cut for record in scored]
    areas = [float(np.count_nonzero(record.prediction)) for record in scored]
    predictions = [record.prediction for record in scored]
    pseudo_reference = gate([record.pseudo for record in scored], labels)
    # "Positive when the predicted foreground exceeds N pixels": area >= N + 1 on integer counts.
    area_threshold = float(min_foreground_pixels) + 1.0
    head_cut = threshold if head_threshold is None else float(head_threshold)
    result: dict[str, Any] = {
        # The classifier decides at the threshold train_classifier chose on validation (its checkpoint's).
        "classifier": {
            **metrics.classification_scores(labels, [r.classifier_probability for r in scored], classifier_cut),
            "threshold": classifier_cut,
        },
        "segmenter": {"vs_pseudo": metrics.segmentation_scores(predictions, pseudo_reference, labels)},
        "segmenter_tile": {
            # The head decides at the threshold train_segmenter chose on validation (its checkpoint's).
            "head": {
                **metrics.classification_scores(labels, [r.head_probability for r in scored], head_cut),
                "threshold": head_cut,
            },
            "area": metrics.classification_scores(labels, areas, area_threshold),
        },
        "tiles": {
            "test": len(scored),
            "positive": int(sum(labels)),
            "negative": int(len(labels) - sum(labels)),
            "classified_positive": int(sum(classified_positive)),
            "with_truth": len(scored) if has_truth else 0,
        },
        "settings": {"threshold": threshold, "min_foreground_pixels": min_foreground_pixels},
    }
    tissues = [record.tissue for record in scored]
    # Trivial reference points: the whole tissue of every tile called positive (by the classifier: what
    # the pipeline could output; by the label: what "lesion = tissue" scores with perfect tile labels).
    baseline = gate(tissues, classified_positive)
    result["baseline"] = {
        "tissue_if_classified_positive": {"vs_pseudo": metrics.segmentation_scores(baseline, pseudo_reference, labels)}
    }
    if has_truth:
        truths = [record.truth for record in scored]
        result["baseline"]["tissue_if_classified_positive"]["vs_truth"] = metrics.segmentation_scores(baseline, truths, labels)
        result["baseline"]["tissue_if_label_positive_oracle_label"] = {
            "vs_truth": metrics.segmentation_scores(gate(tissues, labels), truths, labels)
        }
        result["segmenter"]["vs_truth"] = metrics.segmentation_scores(predictions, truths, labels)
        # What the classification gate does, whichever is configured (an ablation at no cost).
        ungated = [r.prediction if r.prediction_ungated is None else r.prediction_ungated for r in scored]
        result["segmenter_ungated"] = {"vs_truth": metrics.segmentation_scores(ungated, truths, labels)}
        result["segmenter_classifier_gated"] = {
            "vs_truth": metrics.segmentation_scores(gate(ungated, classified_positive), truths, labels)
        }
        cams = [record.cam_mask for record in scored]
        pseudos = [record.pseudo for record in scored]
        for key, masks, keep in (
            ("cam", cams, classified_positive),
            ("cam_oracle_label", cams, labels),
            ("pseudo", pseudos, classified_positive),
            ("pseudo_oracle_label", pseudos, labels),
        ):
            scores = metrics.segmentation_scores(gate(masks, keep), truths, labels)
            result[key] = {"vs_truth": {name: scores[name] for name in ("iou", "dice", "miou", "iou_positive_mean")}}
    return result


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()})


def _row_title(record: TestTile) -> str:
    label = record.tile.label
    return (
        f"{record.tile.stem[:22]}\n{label} | clf p={record.classifier_probability:.2f}\n"
        f"seg head p={record.head_probability:.2f}"
    )


def _write_figures(folder: Path, shown: Sequence[TestTile], has_truth: bool, params: StageParams, result: dict[str, Any]) -> None:
    """Overlays, error maps, uncertainty maps and ROC/confusion pictures of the selected tiles."""
    threshold = params.evaluate.threshold
    classifier_threshold = float(result["classifier"]["threshold"])
    row_titles = [_row_title(record) for record in shown]
    overlay_rows: list[list[np.ndarray]] = []
    error_rows: list[list[np.ndarray]] = []
    uncertainty_rows: list[list[np.ndarray]] = []
    for record in shown:
        if record.image is None or record.probability is None:
            raise EvaluateInputError(f"{record.tile.name}: a figure tile was scored without its image and probability map")
        image, probability = record.image, record.probability
        # What the figures show is what the metrics score: pseudo-masks gated by the label (the segmenter's
        # reference), CAM and pseudo-mask errors gated by the classifier's decision.
        decided = record.classifier_probability >= classifier_threshold
        pseudo_reference, cam_mask, pseudo = gate(
            [record.pseudo, record.cam_mask, record.pseudo], [record.tile.positive, decided, decided]
        )
        row = [image, pseudo_reference]
        if record.truth is not None:
            row.append(record.truth)
        row += [
            record.prediction,
            figures.heatmap(probability),
            figures.overlay_mask(image, record.prediction),
            figures.overlay_heatmap(image, probability),
        ]
        overlay_rows.append(row)
        reference = record.truth if record.truth is not None else pseudo_reference
        errors = [image, reference, record.prediction, figures.error_map(record.prediction, reference)]
        if has_truth:
            errors += [figures.error_map(cam_mask, reference), figures.error_map(pseudo, reference)]
        error_rows.append(errors)
        certainty = figures.uncertainty(probability)
        uncertainty_rows.append(
            [image, figures.heatmap(probability), figures.heatmap(certainty), figures.overlay_heatmap(image, certainty)]
        )
    overlay_columns = ["tile", "pseudo-mask"] + (["true mask"] if has_truth else []) + [
        f"prediction (p>={threshold:g})",
        "probability (blue 0, red 1)",
        "prediction on tile",
        "probability on tile",
    ]
    figures.save_figure(
        folder / "overlays.png",
        overlay_rows,
        column_titles=overlay_columns,
        row_titles=row_titles,
        title="Segmenter on test tiles (positive tiles first)",
    )
    against = "true masks" if has_truth else "pseudo-masks"
    error_columns = ["tile", against, "segmenter", "segmenter errors"] + (
        ["thresholded CAM errors (classifier-gated)", "pseudo-mask errors (classifier-gated)"] if has_truth else []
    )
    figures.save_figure(
        folder / "error_maps.png",
        error_rows,
        column_titles=error_columns,
        row_titles=row_titles,
        title=f"Error maps against {against}\n{ERROR_LEGEND}",
    )
    figures.save_figure(
        folder / "uncertainty.png",
        uncertainty_rows,
        column_titles=["tile", "probability", "uncertainty 1-2|p-0.5|", "uncertainty on tile"],
        row_titles=row_titles,
        title="Segmenter uncertainty (blue: sure, red: undecided)",
    )
    _write_roc_figure(folder / "roc_curves.png", result)


def _write_roc_figure(path: Path, result: dict[str, Any]) -> None:
    """ROC of the three tile-level decisions, with their AUCs, in one readable plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    for name, points, auc in result["_roc_curves"]:
        axis.plot([p["fpr"] for p in points], [p["tpr"] for p in points], label=f"{name} (AUC {auc:.3f})")
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    axis.set_xlabel("false positive rate (1 - specificity)")
    axis.set_ylabel("true positive rate (sensitivity)")
    axis.set_xlim(-0.01, 1.01)
    axis.set_ylim(-0.01, 1.01)
    axis.set_title("ROC on the test partition", fontsize=10)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)


def run(params: StageParams) -> None:
    """Scores the test partition and writes metrics, plot data, figures and an MLflow run.

    Started by ``torchrun``, the test tiles are sharded over the processes (see the module docstring).
    """
    if not launched_by_torchrun():
        _evaluate(params, None)
        return
    try:
        context = init_distributed("auto", params.evaluate.device)
    except RuntimeError as error:
        raise EvaluateInputError(f"evaluate.device: {error}") from None
    if not context.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one process reports
    with leaving_process_group(context):
        _evaluate(params, context)


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
            scored, has_truth, head_threshold, classifier_threshold = _score_tiles(params, tiles, shown)
        else:
            # Each rank scores every world_size-th tile; rank 0 puts them back in order and goes on alone.
            share, has_truth, head_threshold, classifier_threshold = _score_tiles(
                params, shard(tiles, context), shown, context.device
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
    )
    result["settings"]["segmenter_gate"] = settings.segmenter_gate
    labels = [record.tile.positive for record in scored]
    classifier_scores = [record.classifier_probability for record in scored]
    roc_curves = [
        ("classifier", metrics.roc_curve_points(labels, classifier_scores), result["classifier"]["auc"]),
        ("segmenter head", metrics.roc_curve_points(labels, [r.head_probability for r in scored]), result["segmenter_tile"]["head"]["auc"]),
        (
            "segmenter area",
            metrics.roc_curve_points(labels, [float(np.count_nonzero(r.prediction)) for r in scored]),
            result["segmenter_tile"]["area"]["auc"],
        ),
    ]
    negative_labels = sorted({record.tile.label for record in scored if not record.tile.positive})
    negative_name = negative_labels[0] if len(negative_labels) == 1 else f"not {params.data.positive_label}"
    by_name = {record.tile.name: record for record in scored}
    with atomic_directory(FIGURES) as folder:
        _write_figures(folder, [by_name[tile.name] for tile in selected], has_truth, params, {**result, "_roc_curves": roc_curves})
    _write_csv(ROC, ["fpr", "tpr", "threshold"], roc_curves[0][1])
    _write_csv(
        CONFUSION,
        ["actual", "predicted"],
        metrics.confusion_rows(
            labels,
            [score >= classifier_threshold for score in classifier_scores],
            (negative_name, params.data.positive_label),
        ),
    )
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
