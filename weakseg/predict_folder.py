"""The work of the ``predict`` command: every image of a folder through the models into the outputs.

Images are read and prepared (:mod:`weakseg.tile_preparation`) in threads ahead of the models, run through
them in batches of windows (:mod:`weakseg.sliding_window`), and their outputs written in threads behind;
the outputs are those the :mod:`weakseg.predict` command documents.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from weakseg import figures
from weakseg.distributed import select_device
from weakseg.errors import UserInputError
from weakseg.evaluation import CLASSIFIER_AND_HEAD, gate_probability
from weakseg.inference import LoadedModel, load_model, make_forward
from weakseg.io import ImageReadError, read_rgb, write_csv, write_png
from weakseg.refine import mask_from_probability
from weakseg.sliding_window import ImagePrediction, predict_images
from weakseg.tile_preparation import (
    PreparedImage,
    TileNormalization,
    default_normalization,
    load_normalization,
    prepare_image,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
OUTPUT_FOLDERS = ("probabilities", "masks", "overlays", "uncertainty")
CSV_COLUMNS = (
    "image",
    "width",
    "height",
    "tile_probability",
    "tile_probability_source",
    "tile_threshold",
    "tile_positive",
    "predicted_area_pixels",
    "predicted_area_fraction",
    "tissue_fraction",
    "stain_normalized",
    "windows",
)


class PredictInputError(UserInputError):
    """Raised when a predict option or the input folder cannot be used."""


@dataclass(frozen=True)
class PredictOptions:
    """Everything that shapes one prediction run (the parsed command line)."""

    input: Path
    output: Path
    segmenter: Path
    classifier: Path | None
    stain_reference: Path | None
    threshold: float = 0.5
    batch_size: int = 16
    device: str = "auto"
    overlap: int | None = None
    tissue_masking: bool = True
    tissue_min_object_size: int | None = None  # None: as the stain reference file records
    tissue_min_hole_size: int | None = None
    workers: int = 2
    gate: bool = False  # empty the mask of a tile whose tile decision is negative (evaluate.segmenter_gate)
    test_time_augmentation: str = "none"  # "dihedral": pixel logits averaged over 8 rotations and flips
    fill_holes: bool = False  # add the regions each mask encloses (evaluate.fill_holes)
    # With a classifier: the tile decision is the lower of its and the head's probabilities at this cut
    # (evaluate.segmenter_gate: classifier_and_head, whose cut evaluate writes to metrics/evaluate.json).
    classifier_and_head_threshold: float | None = None


@dataclass
class TileResult:
    """One image's prediction, reduced to what the outputs show."""

    probability: np.ndarray
    mask: np.ndarray
    tile_probability: float
    tile_probability_source: str
    tile_threshold: float
    tile_positive: bool
    windows: int


def list_images(folder: Path) -> list[Path]:
    """The image files of ``folder`` (not recursive, hidden files left out), sorted by name.

    Raises:
        PredictInputError: if the folder is missing, holds no image, or two images share a stem (their
            outputs would collide).
    """
    if not folder.is_dir():
        raise PredictInputError(f"{folder}: input folder not found")
    paths = sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise PredictInputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems:
            raise PredictInputError(
                f"{path} and {stems[path.stem]} share the name {path.stem!r}; their outputs would collide"
            )
        stems[path.stem] = path
    return paths


def with_overrides(normalization: TileNormalization, options: PredictOptions) -> TileNormalization:
    """``normalization`` with the tissue sizes the command line sets explicitly."""
    tissue = dict(normalization.tissue)
    overrides = (("min_object_size", options.tissue_min_object_size), ("min_hole_size", options.tissue_min_hole_size))
    for key, value in overrides:
        if value is not None:
            tissue[key] = value
    return TileNormalization(normalization.reference, tissue, normalization.min_tissue_fraction, normalization.source)


def summarize(
    prediction: ImagePrediction,
    tissue: np.ndarray | None,
    threshold: float,
    head_threshold: float,
    gate: bool = False,
    classifier_threshold: float | None = None,
    fill_holes: bool = False,
    classifier_and_head_threshold: float | None = None,
) -> TileResult:
    """The mask (thresholded, inside tissue) and tile probability (classifier if present, else the head;
    the lower of both with ``classifier_and_head_threshold``).

    Args:
        prediction: one image's model outputs.
        tissue: its tissue mask, or None to keep every pixel.
        threshold: the pixel threshold.
        head_threshold: the segmenter head's tile threshold (from its checkpoint).
        gate: empty the mask when the tile decision is negative.
        classifier_threshold: the classifier's tile threshold (from its checkpoint); ``threshold`` if None.
        fill_holes: after the tissue restriction, add the regions the mask encloses
            (:func:`weakseg.refine.fill_enclosed_holes`, as ``evaluate.fill_holes``).
        classifier_and_head_threshold: with a classifier's probability in ``prediction``, the tile decision
            is :func:`weakseg.evaluation.joint_gate_probability` at this cut (``evaluate.segmenter_gate:
            classifier_and_head``).

    Raises:
        PredictInputError: if the prediction has no probability map (no segmenter ran).
    """
    if prediction.probability is None:
        raise PredictInputError("predict needs the segmenter's probability map, and the prediction has none")
    mask = mask_from_probability(prediction.probability, threshold, tissue, fill_holes)
    source = "classifier" if "classifier" in prediction.tile_probabilities else "head"
    if source == "classifier" and classifier_and_head_threshold is not None:
        source, tile_threshold = CLASSIFIER_AND_HEAD, classifier_and_head_threshold
    elif source == "classifier":
        tile_threshold = threshold if classifier_threshold is None else classifier_threshold
    else:
        tile_threshold = head_threshold
    tile_probability = gate_probability(prediction.tile_probabilities, source)
    if gate and tile_probability < tile_threshold:
        mask = np.zeros_like(mask)
    return TileResult(
        prediction.probability,
        mask,
        tile_probability,
        source,
        tile_threshold,
        tile_probability >= tile_threshold,
        prediction.windows,
    )


def write_outputs(output: Path, prepared: PreparedImage, result: TileResult) -> dict[str, Any]:
    """Writes one image's four pictures and returns its CSV row."""
    stem = Path(prepared.name).stem + ".png"
    probability = result.probability
    write_png(output / "probabilities" / stem, np.clip(np.rint(probability * 255.0), 0, 255).astype(np.uint8))
    write_png(output / "masks" / stem, result.mask)
    write_png(output / "overlays" / stem, figures.overlay_mask(prepared.original, result.mask))
    write_png(output / "uncertainty" / stem, figures.heatmap(figures.uncertainty(probability)))
    height, width = result.mask.shape
    area = int(np.count_nonzero(result.mask))
    return {
        "image": prepared.name,
        "width": width,
        "height": height,
        "tile_probability": f"{result.tile_probability:.6f}",
        "tile_probability_source": result.tile_probability_source,
        "tile_threshold": f"{result.tile_threshold:.6f}",
        "tile_positive": int(result.tile_positive),
        "predicted_area_pixels": area,
        "predicted_area_fraction": f"{area / (height * width):.6f}",
        "tissue_fraction": "" if prepared.tissue is None else f"{float(prepared.tissue.mean()):.6f}",
        "stain_normalized": int(prepared.stain_normalized),
        "windows": result.windows,
    }


def _load_models(options: PredictOptions, device: torch.device) -> tuple[LoadedModel, LoadedModel | None, int]:
    """The segmenter, the optional classifier, and the window overlap (checked against the tile size)."""
    segmenter = load_model(options.segmenter, "segmenter", device)
    classifier = load_model(options.classifier, "classifier", device) if options.classifier is not None else None
    tile_size = segmenter.preprocessing.tile_size
    overlap = options.overlap if options.overlap is not None else tile_size // 4
    if overlap >= tile_size:
        raise PredictInputError(f"--overlap {overlap} must be smaller than the segmenter's tile size {tile_size}")
    return segmenter, classifier, overlap


def run_predict(options: PredictOptions) -> list[str]:
    """Predicts every image of ``options.input`` into ``options.output``.

    Returns:
        Messages naming each skipped (unreadable) file; empty when all were written.

    Raises:
        UserInputError: for unusable options, checkpoints, stain reference or input folder.
    """
    paths = list_images(options.input)
    try:
        device = select_device(options.device)
    except RuntimeError as error:
        raise PredictInputError(f"--device: {error}") from None
    if options.stain_reference is None:
        normalization = with_overrides(default_normalization(), options)
    else:
        normalization = with_overrides(load_normalization(options.stain_reference), options)
    segmenter, classifier, overlap = _load_models(options, device)
    forward = make_forward(
        segmenter.model, classifier.model if classifier is not None else None, options.test_time_augmentation
    )
    for folder in OUTPUT_FOLDERS:
        (options.output / folder).mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    rows: list[dict[str, Any]] = []

    def load(path: Path) -> PreparedImage | str:
        try:
            return prepare_image(read_rgb(path), path.name, normalization, options.tissue_masking)
        except ImageReadError as error:
            return str(error)

    with ThreadPoolExecutor(max_workers=options.workers) as pool:
        # Reading and normalizing run ahead of the model in threads, a bounded number of images at a time.
        def prepared_images() -> Iterator[tuple[PreparedImage, np.ndarray]]:
            ahead: deque[Future[PreparedImage | str]] = deque()
            queue = iter(paths)
            for path in queue:
                ahead.append(pool.submit(load, path))
                if len(ahead) >= 2 * options.batch_size:
                    break
            while ahead:
                outcome = ahead.popleft().result()
                next_path = next(queue, None)
                if next_path is not None:
                    ahead.append(pool.submit(load, next_path))
                if isinstance(outcome, str):
                    skipped.append(outcome)
                    print(f"weakseg predict: skipped {outcome}", file=sys.stderr)
                    continue
                yield outcome, outcome.normalized

        writes: deque[Future[dict[str, Any]]] = deque()
        predictions = predict_images(
            prepared_images(), forward, segmenter.preprocessing, device, options.batch_size, overlap
        )
        for prepared, prediction in tqdm(predictions, total=len(paths), desc="predict", unit="image"):
            result = summarize(
                prediction,
                prepared.tissue,
                options.threshold,
                segmenter.head_threshold,
                options.gate,
                classifier_threshold=classifier.decision_threshold if classifier is not None else None,
                fill_holes=options.fill_holes,
                classifier_and_head_threshold=options.classifier_and_head_threshold,
            )
            writes.append(pool.submit(write_outputs, options.output, prepared, result))
            while len(writes) > 2 * options.batch_size:
                rows.append(writes.popleft().result())
        rows.extend(future.result() for future in writes)
    write_csv(options.output / "predictions.csv", rows, CSV_COLUMNS)
    return skipped
