"""What the ``evaluate`` stage scores: both models run over the test tiles, beside the masks on disk.

:func:`score_tiles` reads the test tiles' images, tissue masks, CAMs, pseudo-masks and (where the dataset
has them) true masks, runs the classifier and the segmenter, and returns one
:class:`~weakseg.evaluation.TestTile` per tile for :func:`weakseg.evaluation.compute_metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from weakseg.data.layout import Tile, partition, read_annotations, split_train_validation
from weakseg.distributed import select_device
from weakseg.evaluation import (
    CLASSIFIER_AND_HEAD,
    EvaluateInputError,
    TestTile,
    choose_joint_gate_threshold,
    gate_probability,
)
from weakseg.inference import BatchForward, Preprocessing, load_model, make_forward
from weakseg.io import read_gray, read_json, read_mask, read_pseudo_mask, read_rgb
from weakseg.params import RefineParams, StageParams
from weakseg.pseudo_masks import needs_normal_tissue_estimate, resolve_quantiles
from weakseg.refine import RefineInputError, mask_from_probability, threshold_cam
from weakseg.sliding_window import predict_images

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationInputs:
    """Where the evaluate stage reads: the folders of earlier stages and the two checkpoints."""

    normalized: Path  # images/, tissue/ and annotations.csv
    true_masks: Path  # absent when the dataset has no pixel truth
    cams: Path
    pseudo_masks: Path
    classifier: Path
    segmenter: Path
    cam_metrics: Path  # generate_cams' normal-tissue estimate, which refine.threshold_quantile: auto builds on


def _check_shape(path: Path, array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if array.shape[:2] != shape:
        raise EvaluateInputError(
            f"{path}: size {array.shape[1]}x{array.shape[0]} differs from its tile's {shape[1]}x{shape[0]}"
        )
    return array


def cam_threshold_quantile(refine: RefineParams, cam_metrics: Path) -> float:
    """The foreground quantile refine_masks used: ``refine.threshold_quantile``, its ``auto`` resolved.

    Raises:
        EvaluateInputError: for ``auto`` on ``background_quantile: auto`` without generate_cams' estimate.
    """
    if refine.threshold_quantile != "auto":
        return float(refine.threshold_quantile)
    if not needs_normal_tissue_estimate(refine):  # a numeric background quantile: nothing to read
        return resolve_quantiles(refine, None)[0]
    if not cam_metrics.is_file():
        raise EvaluateInputError(
            f"{cam_metrics}: not found; refine.threshold_quantile: auto needs generate_cams' normal-tissue "
            "estimate (re-run generate_cams)"
        )
    try:
        return resolve_quantiles(refine, read_json(cam_metrics).get("normal_tissue_fraction"))[0]
    except RefineInputError as error:
        raise EvaluateInputError(f"{cam_metrics}: {error}") from None


def validation_joint_threshold(
    params: StageParams,
    inputs: EvaluationInputs,
    forward: BatchForward,
    preprocessing: Preprocessing,
    device: torch.device,
) -> float:
    """The ``classifier_and_head`` gate's cut, chosen on the validation split of ``train`` (never the test tiles).

    The split is the one both models were selected on (``split.validation_fraction``, ``split.seed``); the
    cut follows ``classifier.decision_rule``, as the classifier's own does.

    Raises:
        EvaluateInputError: if the train partition cannot be split as the training stages split it.
    """
    annotations = inputs.normalized / "annotations.csv"
    tiles = read_annotations(annotations, params.data.positive_label)
    try:
        _, validation = split_train_validation(
            partition(tiles, "train"), params.split.validation_fraction, params.split.seed
        )
    except ValueError as error:
        raise EvaluateInputError(f"{annotations}: {error} (see split.validation_fraction)") from None
    images_folder = inputs.normalized / "images"

    def images() -> Iterator[tuple[int, np.ndarray]]:
        for index, tile in enumerate(validation):
            yield index, read_rgb(images_folder / tile.name)

    classifier_probabilities: list[float] = []
    head_probabilities: list[float] = []
    predictions = predict_images(images(), forward, preprocessing, device, params.evaluate.batch_size)
    for _, prediction in tqdm(predictions, total=len(validation), desc="evaluate: validation tiles", leave=False):
        classifier_probabilities.append(float(prediction.tile_probabilities["classifier"]))
        head_probabilities.append(float(prediction.tile_probabilities["head"]))
    labels = [tile.positive for tile in validation]
    choice = choose_joint_gate_threshold(
        labels, classifier_probabilities, head_probabilities, params.classifier.decision_rule
    )
    (LOGGER.warning if choice.reason else LOGGER.info)(
        "classifier_and_head gate: cut %.4f on %d validation tiles (%s)%s",
        choice.threshold,
        len(validation),
        choice.rule,
        f"; {choice.reason}" if choice.reason else "",
    )
    return choice.threshold


def score_tiles(
    params: StageParams,
    inputs: EvaluationInputs,
    tiles: list[Tile],
    shown: set[str],
    device: torch.device | None = None,
) -> tuple[list[TestTile], bool, float, float, float | None]:
    """Runs both models over the test tiles and gathers every mask the metrics need.

    Args:
        params: the evaluate stage's params (``evaluate``, ``refine.threshold_quantile`` with what its
            ``auto`` builds on, ``refine.restrict_to_tissue``, ``data.positive_label``).
        inputs: where the tiles, masks and checkpoints are.
        tiles: the test tiles to score, in order.
        shown: names of the figure tiles, whose image and probability map are kept.
        device: a distributed rank's GPU; replaces ``evaluate.device`` when given.

    Returns:
        The scored tiles, whether true masks exist, the tile thresholds of the segmenter head and of the
        classifier from their checkpoints, and the ``classifier_and_head`` gate's cut chosen on validation
        (None unless ``evaluate.segmenter_gate`` is that gate).

    Raises:
        EvaluateInputError: for an unusable device, a model of another positive label, or a mask whose
            size differs from its tile's.
        InferenceError: for a checkpoint or image the models cannot use.
    """
    settings = params.evaluate
    if device is None:
        try:
            device = select_device(settings.device)
        except RuntimeError as error:
            raise EvaluateInputError(f"evaluate.device: {error}") from None
    classifier = load_model(inputs.classifier, "classifier", device)
    segmenter = load_model(inputs.segmenter, "segmenter", device)
    for model in (classifier, segmenter):
        if model.positive_label is not None and model.positive_label != params.data.positive_label:
            raise EvaluateInputError(
                f"{model.path}: trained for positive label {model.positive_label!r}, but data.positive_label "
                f"is {params.data.positive_label!r}; re-run the pipeline"
            )
    has_truth = inputs.true_masks.is_dir()
    forward = make_forward(segmenter.model, classifier.model, settings.test_time_augmentation)
    classifier_threshold = classifier.decision_threshold
    head_threshold = segmenter.head_threshold
    joint_threshold = None
    if settings.segmenter_gate == CLASSIFIER_AND_HEAD:
        # Tile probabilities do not depend on test-time augmentation: the plain forward is enough.
        plain_forward = make_forward(segmenter.model, classifier.model)
        joint_threshold = validation_joint_threshold(params, inputs, plain_forward, segmenter.preprocessing, device)
    # The tile decision that gates the segmenter's mask.
    gate_threshold = {
        "classifier": classifier_threshold,
        "head": head_threshold,
        CLASSIFIER_AND_HEAD: joint_threshold,
    }.get(settings.segmenter_gate)
    images_folder, tissue_folder = inputs.normalized / "images", inputs.normalized / "tissue"
    cam_quantile = cam_threshold_quantile(params.refine, inputs.cam_metrics)

    def images() -> Iterator[tuple[int, np.ndarray]]:
        for index, tile in enumerate(tiles):
            yield index, read_rgb(images_folder / tile.name)

    scored: list[TestTile] = []
    predictions = predict_images(images(), forward, segmenter.preprocessing, device, settings.batch_size)
    for index, prediction in tqdm(predictions, total=len(tiles), desc="evaluate: test tiles", leave=False):
        tile = tiles[index]
        if prediction.probability is None:
            raise EvaluateInputError(f"{inputs.segmenter}: the model gave no probability map for {tile.name}")
        shape = prediction.probability.shape
        tissue = _check_shape(tissue_folder / tile.name, read_mask(tissue_folder / tile.name), shape)
        cam = _check_shape(inputs.cams / tile.name, read_gray(inputs.cams / tile.name), shape)
        # The foreground only: a pseudo-mask's ignored band (128) is not lesion.
        pseudo_path = inputs.pseudo_masks / tile.name
        pseudo = _check_shape(pseudo_path, read_pseudo_mask(pseudo_path)[0], shape)
        truth_path = inputs.true_masks / tile.name
        truth = _check_shape(truth_path, read_mask(truth_path), shape) if has_truth else None
        predicted = mask_from_probability(
            prediction.probability,
            settings.threshold,
            tissue if params.refine.restrict_to_tissue else None,
            settings.fill_holes,
        )
        cam_mask = threshold_cam(cam, tissue, cam_quantile, params.refine.restrict_to_tissue)
        ungated = None
        if (
            gate_threshold is not None
            and gate_probability(prediction.tile_probabilities, settings.segmenter_gate) < gate_threshold
        ):
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
            record.image = read_rgb(images_folder / tile.name)
            record.probability = prediction.probability
        scored.append(record)
    return scored, has_truth, head_threshold, classifier_threshold, joint_threshold
