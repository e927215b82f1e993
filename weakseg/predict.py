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
import sys
from collections.abc import Sequence
from pathlib import Path

from weakseg.errors import UserInputError
from weakseg.inference import TEST_TIME_AUGMENTATIONS
from weakseg.predict_folder import PredictInputError, PredictOptions, run_predict

DEFAULT_STAIN_REFERENCE = "data/normalized/stain_reference.json"
EXIT_SKIPPED = 1
EXIT_USER_ERROR = 2


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
        "--classifier",
        type=Path,
        default=None,
        help="classifier checkpoint for the tile probability (default: the segmenter's head)",
    )
    parser.add_argument(
        "--stain-reference",
        default=DEFAULT_STAIN_REFERENCE,
        help=f"stain reference JSON from the normalize stage (default: {DEFAULT_STAIN_REFERENCE}); "
        "'none' skips normalization",
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
        "--overlap",
        type=int,
        default=None,
        help="pixels shared by neighbouring windows of large images (default: tile size / 4)",
    )
    parser.add_argument("--no-tissue-mask", action="store_true", help="do not restrict the mask to tissue")
    parser.add_argument(
        "--gate",
        action="store_true",
        help="empty the mask of a tile whose tile decision is negative (as evaluate.segmenter_gate: classifier "
        "does; with --classifier the classifier decides, with --classifier-and-head-threshold too both models, "
        "else the segmenter head)",
    )
    parser.add_argument(
        "--classifier-and-head-threshold",
        type=float,
        default=None,
        help="with --classifier: the tile decision is the lower of the classifier's and the segmenter head's "
        "probabilities at this cut (as evaluate.segmenter_gate: classifier_and_head, weakseg's default; the cut "
        "evaluate chose on validation is classifier_and_head.threshold in metrics/evaluate.json)",
    )
    parser.add_argument(
        "--fill-holes",
        action="store_true",
        help="add to each mask the regions it encloses, such as gland lumens inside a lesion (after the tissue "
        "restriction; as evaluate.fill_holes does)",
    )
    parser.add_argument(
        "--tissue-min-object-size", type=int, default=None, help="override the stain reference's recorded value"
    )
    parser.add_argument(
        "--tissue-min-hole-size", type=int, default=None, help="override the stain reference's recorded value"
    )
    parser.add_argument(
        "--test-time-augmentation",
        choices=TEST_TIME_AUGMENTATIONS,
        default="none",
        help="'dihedral': each pixel's logit is the mean over the window's 8 rotations and flips (8x the "
        "segmenter's time; evaluate.test_time_augmentation does the same); tile decisions are unchanged",
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
    joint = arguments.classifier_and_head_threshold
    if joint is not None and not 0.0 <= joint <= 1.0:
        raise PredictInputError(f"--classifier-and-head-threshold must be between 0 and 1, got {joint}")
    if joint is not None and arguments.classifier is None:
        raise PredictInputError("--classifier-and-head-threshold needs --classifier (the gate takes both models)")
    if arguments.workers < 1:
        raise PredictInputError(f"--workers must be >= 1, got {arguments.workers}")
    for flag, value in (
        ("--tissue-min-object-size", arguments.tissue_min_object_size),
        ("--tissue-min-hole-size", arguments.tissue_min_hole_size),
    ):
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
        test_time_augmentation=arguments.test_time_augmentation,
        fill_holes=arguments.fill_holes,
        classifier_and_head_threshold=joint,
    )


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
