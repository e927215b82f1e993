"""``weakseg-predict``: a folder of new H&E tiles -> probability maps, masks, overlays, uncertainty maps, CSV.

Each image is stain-normalized with the reference the ``normalize`` stage fitted, its tissue found with the
settings that stage recorded beside the reference (so new tiles are prepared exactly as training tiles
were), and cut into windows of the segmenter's tile size (overlapping, blended back; smaller images are
padded by reflection and cropped back). The mask is the thresholded probability inside the tissue mask.
The tile decision compares the classifier's probability with the threshold ``train_classifier`` chose on
the validation split, or the segmenter head's with the threshold ``train_segmenter`` chose there (each stored
in its checkpoint); ``--threshold`` thresholds pixels only. Unreadable
files are reported by name and skipped; the exit status is then 1, after every readable image is written.

Outputs under ``--output``::

    probabilities/STEM.png   8-bit foreground probability (0..255 = 0..1)
    masks/STEM.png           0/255 predicted mask
    overlays/STEM.png        the image with the mask tinted and outlined
    uncertainty/STEM.png     U = 1 - 2|p - 0.5| as a heatmap (blue: sure, red: undecided)
    predictions.csv          one row per image: tile probability, its threshold, predicted area, ...

Usage: ``python -m weakseg.predict --input FOLDER --output FOLDER [options]``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from tqdm import tqdm

from weakseg import figures
from weakseg.errors import UserInputError
from weakseg.inference import ImagePrediction, LoadedModel, load_model, make_forward, predict_images
from weakseg.io import ImageReadError, atomic_path, read_rgb, write_png
from weakseg.params import NormalizeParams, TissueParams
from weakseg.stain import (
    StainReference,
    StainReferenceError,
    load_normalize_settings,
    load_stain_reference,
    normalize_tile,
    tissue_mask,
)
from weakseg.training.common import select_device

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_STAIN_REFERENCE = "data/normalized/stain_reference.json"
EXIT_SKIPPED = 1
EXIT_USER_ERROR = 2
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


# The keyword arguments of weakseg.stain.tissue_mask that the normalize stage records.
TISSUE_SETTING_KEYS = (
    "min_object_size",
    "min_hole_size",
    "background_intensity",
    "threshold_min",
    "threshold_max",
    "min_green_excess",
)


@dataclass(frozen=True)
class TileNormalization:
    """How a new tile is prepared: the stain reference and tissue settings the ``normalize`` stage used.

    Attributes:
        reference: the stain reference; None leaves tiles unnormalized (``normalize.method: none``, or
            ``--stain-reference none``).
        tissue: keyword arguments of :func:`weakseg.stain.tissue_mask` (:data:`TISSUE_SETTING_KEYS`).
        min_tissue_fraction: a tile with fewer stained pixels passes through unnormalized.
        source: the file these came from, or ``"defaults"``.
    """

    reference: StainReference | None
    tissue: dict[str, Any]
    min_tissue_fraction: float
    source: str


def default_normalization() -> TileNormalization:
    """No stain reference, and the tissue settings of the default ``normalize`` parameters."""
    defaults = NormalizeParams()
    tissue = {key: getattr(defaults.tissue, key) for key in TISSUE_SETTING_KEYS if key != "background_intensity"}
    tissue["background_intensity"] = defaults.background_intensity
    return TileNormalization(None, tissue, defaults.min_tissue_fraction, "defaults")


def load_normalization(path: Path) -> TileNormalization:
    """The stain reference and the tissue settings recorded beside it in ``stain_reference.json``.

    Raises:
        StainReferenceError: naming the file, if it is missing or malformed, or records no (or unusable)
            tissue settings: predict would then find tissue differently from the tiles the models saw.
    """
    reference = load_stain_reference(path)
    settings = load_normalize_settings(path)
    missing = [key for key in ("tissue", "min_tissue_fraction") if key not in settings]
    if missing:
        raise StainReferenceError(
            f"{path}: records no {' or '.join(missing)}, so tiles cannot be prepared as the normalize stage "
            f"prepared the training tiles; use a stain_reference.json written by the normalize stage "
            f"(or --stain-reference none for no normalization and default tissue settings)"
        )
    tissue = settings["tissue"]
    if not isinstance(tissue, dict) or set(tissue) != set(TISSUE_SETTING_KEYS):
        found = sorted(tissue) if isinstance(tissue, dict) else type(tissue).__name__
        raise StainReferenceError(f"{path}: 'tissue' must hold exactly {list(TISSUE_SETTING_KEYS)}, got {found}")
    try:
        checked = NormalizeParams(
            background_intensity=tissue["background_intensity"],
            min_tissue_fraction=settings["min_tissue_fraction"],
            tissue=TissueParams(**{key: tissue[key] for key in TISSUE_SETTING_KEYS if key != "background_intensity"}),
        )
    except ValidationError as error:
        problems = "; ".join(
            ": ".join(filter(None, (".".join(str(part) for part in item["loc"]), item["msg"])))
            for item in error.errors()
        )
        raise StainReferenceError(f"{path}: unusable tissue settings ({problems})") from None
    return TileNormalization(reference, dict(tissue), checked.min_tissue_fraction, str(path))


@dataclass
class PreparedImage:
    """One input image ready for the model, with what its outputs need."""

    name: str
    original: np.ndarray
    normalized: np.ndarray
    tissue: np.ndarray | None
    stain_normalized: bool


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


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``weakseg-predict``."""
    parser = argparse.ArgumentParser(
        prog="weakseg-predict",
        description="Segment a folder of H&E tiles with a trained weakseg segmenter.",
    )
    parser.add_argument("--input", required=True, type=Path, help="folder of images (png, jpg, tif, bmp)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the outputs (created)")
    parser.add_argument("--segmenter", type=Path, default=Path("models/segmenter.pt"), help="segmenter checkpoint")
    parser.add_argument(
        "--classifier", type=Path, default=None, help="classifier checkpoint for the tile probability (default: the segmenter's head)"
    )
    parser.add_argument(
        "--stain-reference",
        default=DEFAULT_STAIN_REFERENCE,
        help=f"stain reference JSON from the normalize stage (default: {DEFAULT_STAIN_REFERENCE}); 'none' skips normalization",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="probability threshold of the mask's pixels (default 0.5); tile decisions use the threshold stored "
        "in the deciding checkpoint (the classifier's with --classifier, else the segmenter head's), chosen "
        "on validation when it was trained",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default 16)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    parser.add_argument(
        "--overlap", type=int, default=None, help="pixels shared by neighbouring windows of large images (default: tile size / 4)"
    )
    parser.add_argument("--no-tissue-mask", action="store_true", help="do not restrict the mask to tissue")
    parser.add_argument(
        "--gate",
        action="store_true",
        help="empty the mask of a tile whose tile decision is negative (as evaluate.segmenter_gate: classifier "
        "does; with --classifier the classifier decides, else the segmenter head)",
    )
    parser.add_argument(
        "--tissue-min-object-size", type=int, default=None, help="override the stain reference's recorded value"
    )
    parser.add_argument(
        "--tissue-min-hole-size", type=int, default=None, help="override the stain reference's recorded value"
    )
    parser.add_argument("--workers", type=int, default=2, help="threads reading and writing files (default 2)")
    return parser


def parse_options(argv: Sequence[str] | None) -> PredictOptions:
    """Parses and checks the command line.

    Raises:
        PredictInputError: naming the option that is out of range.
    """
    arguments = build_parser().parse_args(argv)
    if not 0.0 < arguments.threshold < 1.0:
        raise PredictInputError(f"--threshold must be between 0 and 1, got {arguments.threshold}")
    if arguments.batch_size < 1:
        raise PredictInputError(f"--batch-size must be >= 1, got {arguments.batch_size}")
    if arguments.overlap is not None and arguments.overlap < 0:
        raise PredictInputError(f"--overlap must be >= 0, got {arguments.overlap}")
    if arguments.workers < 1:
        raise PredictInputError(f"--workers must be >= 1, got {arguments.workers}")
    for flag, value in (("--tissue-min-object-size", arguments.tissue_min_object_size), ("--tissue-min-hole-size", arguments.tissue_min_hole_size)):
        if value is not None and value < 0:
            raise PredictInputError(f"{flag} must be >= 0, got {value}")
    reference = None if str(arguments.stain_reference).lower() == "none" else Path(arguments.stain_reference)
    return PredictOptions(
        input=arguments.input,
        output=arguments.output,
        segmenter=arguments.segmenter,
        classifier=arguments.classifier,
        stain_reference=reference,
        threshold=arguments.threshold,
        batch_size=arguments.batch_size,
        device=arguments.device,
        overlap=arguments.overlap,
        tissue_masking=not arguments.no_tissue_mask,
        tissue_min_object_size=arguments.tissue_min_object_size,
        tissue_min_hole_size=arguments.tissue_min_hole_size,
        workers=arguments.workers,
        gate=arguments.gate,
    )


def list_images(folder: Path) -> list[Path]:
    """The image files of ``folder`` (not recursive, hidden files left out), sorted by name.

    Raises:
        PredictInputError: if the folder is missing, holds no image, or two images share a stem (their
            outputs would collide).
    """
    if not folder.is_dir():
        raise PredictInputError(f"{folder}: input folder not found")
    paths = sorted(
        path for path in folder.iterdir() if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise PredictInputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems:
            raise PredictInputError(f"{path} and {stems[path.stem]} share the name {path.stem!r}; their outputs would collide")
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


def prepare_image(
    image: np.ndarray, name: str, normalization: TileNormalization, tissue_masking: bool = True
) -> PreparedImage:
    """Stain-normalizes one image and finds its tissue, as the ``normalize`` stage does for training tiles.

    The tissue mask is computed on the image as read (not the normalized one), as ``normalize`` does.
    """
    normalized, was_normalized = normalize_tile(image, normalization.reference, normalization.min_tissue_fraction)
    tissue = tissue_mask(image, **normalization.tissue) if tissue_masking else None
    return PreparedImage(name, image, normalized, tissue, was_normalized)


def summarize(
    prediction: ImagePrediction,
    tissue: np.ndarray | None,
    threshold: float,
    head_threshold: float,
    gate: bool = False,
    classifier_threshold: float | None = None,
) -> TileResult:
    """The mask (thresholded, inside tissue) and tile probability (classifier if present, else the head).

    Args:
        prediction: one image's model outputs.
        tissue: its tissue mask, or None to keep every pixel.
        threshold: the pixel threshold.
        head_threshold: the segmenter head's tile threshold (from its checkpoint).
        gate: empty the mask when the tile decision is negative.
        classifier_threshold: the classifier's tile threshold (from its checkpoint); ``threshold`` if None.

    Raises:
        PredictInputError: if the prediction has no probability map (no segmenter ran).
    """
    if prediction.probability is None:
        raise PredictInputError("predict needs the segmenter's probability map, and the prediction has none")
    mask = prediction.probability >= threshold
    if tissue is not None:
        mask &= tissue
    source = "classifier" if "classifier" in prediction.tile_probabilities else "head"
    tile_probability = prediction.tile_probabilities[source]
    if source == "classifier":
        tile_threshold = threshold if classifier_threshold is None else classifier_threshold
    else:
        tile_threshold = head_threshold
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
    forward = make_forward(segmenter.model, classifier.model if classifier is not None else None)
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
        predictions = predict_images(prepared_images(), forward, segmenter.preprocessing, device, options.batch_size, overlap)
        for prepared, prediction in tqdm(predictions, total=len(paths), desc="predict", unit="image"):
            result = summarize(
                prediction,
                prepared.tissue,
                options.threshold,
                segmenter.head_threshold,
                options.gate,
                classifier_threshold=classifier.decision_threshold if classifier is not None else None,
            )
            writes.append(pool.submit(write_outputs, options.output, prepared, result))
            while len(writes) > 2 * options.batch_size:
                rows.append(writes.popleft().result())
        rows.extend(future.result() for future in writes)
    with atomic_path(options.output / "predictions.csv") as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return skipped


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command.

    Returns:
        0 when every image was written, 1 when some files were skipped as unreadable (named on stderr),
        2 on a user error (bad option, missing checkpoint, stain reference or input folder).
    """
    try:
        options = parse_options(argv)
        skipped = run_predict(options)
    except UserInputError as error:
        print(f"weakseg predict: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    if skipped:
        print(f"weakseg predict: {len(skipped)} file(s) skipped as unreadable:", file=sys.stderr)
        for message in skipped:
            print(f"  {message}", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
