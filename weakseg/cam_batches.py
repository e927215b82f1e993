"""The CAMs of a tile list, batch by batch, as the ``generate_cams`` stage writes them.

Which tiles get a CAM (:func:`tiles_needing_cams`), how they are batched (consecutive tiles of one size,
:func:`same_size_batches`; :func:`batch_plan` finds the same batches from image headers alone, so the
processes of a distributed run agree on them), each batch's noise seed (:func:`batch_seed`, from the
run's seed and the batch's index, so the noise does not depend on the device or the process count), and
the CAM of the positive class of every tile of a batch (:func:`batch_cams`), written and counted by
:class:`CamTally`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from weakseg.cam import cam_to_uint8, compute_cams, dihedral_mean, images_to_model_input, normalize_maps
from weakseg.data.layout import Tile, figure_negative_tile, partition, read_annotations, split_train_validation
from weakseg.errors import UserInputError
from weakseg.io import read_mask, read_rgb, write_json, write_png
from weakseg.normal_tissue import (
    MIN_REFERENCE_TILES,
    NormalTissueEstimate,
    estimate_normal_tissue_fraction,
    mean_crop_evidence_maps,
    tissue_evidence,
)
from weakseg.params import CamParams, StageParams
from weakseg.params.pseudo_masks import CROP_EVIDENCE_NEEDS_A_SIZE
from weakseg.tracking import StageRun

LOGGER = logging.getLogger(__name__)

# One tile's CAM as it travels and is written: its name, its uint8 heatmap, its mean activation (of the
# float map) and 1 if the map is flat (no activation for the class), else 0.
EncodedCam = tuple[str, np.ndarray, float, int]


def tiles_needing_cams(tiles: list[Tile], negative_train_tiles: bool) -> list[Tile]:
    """The tiles whose CAM is computed, in annotation order.

    Every positive train tile (the pseudo-masks are refined from them); every test tile, whatever its
    label (``evaluate`` gates the CAM by the classifier's decision); negative train tiles only when
    ``negative_train_tiles`` asks, except the one negative tile that ``refine_masks``'s figure shows.
    """
    shown = figure_negative_tile(tiles)
    return [
        tile for tile in tiles if tile.positive or tile.partition == "test" or negative_train_tiles or tile == shown
    ]


def same_size_batches(
    tiles: list[Tile], images_folder: Path, batch_size: int
) -> Iterator[tuple[list[Tile], np.ndarray]]:
    """Yields ``(tiles, images)`` batches of consecutive tiles that share one size."""
    batch_tiles: list[Tile] = []
    batch_images: list[np.ndarray] = []
    for tile in tiles:
        image = read_rgb(images_folder / tile.name)
        if batch_images and (image.shape != batch_images[0].shape or len(batch_images) == batch_size):
            yield batch_tiles, np.stack(batch_images)
            batch_tiles, batch_images = [], []
        batch_tiles.append(tile)
        batch_images.append(image)
    if batch_images:
        yield batch_tiles, np.stack(batch_images)


def batch_plan(tiles: list[Tile], images_folder: Path, batch_size: int) -> list[list[int]]:
    """The tile indices of each batch :func:`same_size_batches` would yield, from image headers only.

    Lets every process of a distributed run agree on the batches (and so on each batch's noise seed)
    without decoding the tiles that other processes will handle.
    """
    plan: list[list[int]] = []
    previous_size: tuple[int, int] | None = None
    for index, tile in enumerate(tiles):
        path = images_folder / tile.name
        try:
            with Image.open(path) as image:
                size = image.size
        except (OSError, SyntaxError):
            size = (-1, -1)  # read_rgb names the file when its batch is decoded
        if plan and (size != previous_size or len(plan[-1]) == batch_size):
            plan.append([])
        if not plan:
            plan.append([])
        plan[-1].append(index)
        previous_size = size
    return plan


def batch_seed(seed: int, batch_index: int) -> int:
    """One noise seed per batch, derived from the run's seed, so the noise does not depend on the device."""
    return seed * 1_000_003 + batch_index


def evidence_crop_size(settings: CamParams, classifier_crop_size: int | None) -> int:
    """The crop side of ``cam.method: crop_evidence``: ``cam.evidence_crop_size``, else half the classifier's.

    Raises:
        UserInputError: if neither is set (a classifier trained on whole tiles has no crop scale to halve).
    """
    if settings.evidence_crop_size is not None:
        return settings.evidence_crop_size
    if classifier_crop_size is None:
        raise UserInputError(CROP_EVIDENCE_NEEDS_A_SIZE)
    return max(classifier_crop_size // 2, 1)


def crop_evidence_cams(
    model: nn.Module,
    images: np.ndarray,
    crop_size: int,
    device: torch.device,
    preprocessing: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """The classifier's mean crop logit at each pixel (:func:`~weakseg.normal_tissue.mean_crop_evidence_maps`), 0..1.

    Args:
        model: the one-logit classifier.
        images: ``(N, H, W, 3)`` uint8 RGB tiles of one size.
        crop_size: the side of the sliding crops (a quarter of it is the step between them).
        device: where the model runs.
        preprocessing: the checkpoint's preprocessing record.

    Returns:
        ``(N, H, W)`` float32 maps, each scaled to 0..1 as a CAM is.
    """
    model = model.to(device).eval()
    inputs = images_to_model_input(np.asarray(images), preprocessing).to(device)
    with torch.no_grad():
        maps = mean_crop_evidence_maps(model, inputs, crop_size)
    return normalize_maps(maps.float()).cpu().numpy().astype(np.float32)


def batch_cams(
    model: nn.Module,
    tiles: Sequence[Tile],
    images: np.ndarray,
    settings: CamParams,
    seed: int,
    device: torch.device,
    preprocessing: Mapping[str, Any] | None,
    classifier_crop_size: int | None = None,
) -> list[EncodedCam]:
    """The CAM of the positive class of each tile of one batch, encoded for writing (see ``EncodedCam``).

    Args:
        model: the classifier.
        tiles: the batch's tiles.
        images: their ``(N, H, W, 3)`` uint8 RGB images, of one size.
        settings: the ``cam`` params (method, layer, noise, Score-CAM batch size, test-time augmentation).
        seed: the batch's noise seed (:func:`batch_seed`).
        device: where the model runs.
        preprocessing: the checkpoint's preprocessing record.
        classifier_crop_size: ``classifier.crop_size``, whose half is ``crop_evidence``'s default crop.
    """
    compute: Callable[[np.ndarray], np.ndarray]
    if settings.method == "crop_evidence":
        compute = functools.partial(
            crop_evidence_cams,
            model,
            crop_size=evidence_crop_size(settings, classifier_crop_size),
            device=device,
            preprocessing=preprocessing,
        )
    else:
        compute = functools.partial(
            compute_cams,
            model,
            positives=[True] * len(tiles),  # the positive class's evidence, whatever the label
            method=settings.method,
            target_layer=settings.target_layer,
            num_samples=settings.num_samples,
            std=settings.std,
            seed=seed,
            device=device,
            preprocessing=preprocessing,
            score_batch_size=settings.batch_size,
        )
    cams = dihedral_mean(compute, images) if settings.test_time_augmentation == "dihedral" else compute(images)
    # uint8 maps travel (a quarter of float32); the statistics are taken from the floats here.
    return [
        (tile.name, cam_to_uint8(cam), float(cam.mean()), int(cam.max() == 0.0))
        for tile, cam in zip(tiles, cams, strict=True)
    ]


@dataclass
class CamTally:
    """Writes encoded CAMs into the output folder and counts what the stage reports."""

    coverage: list[float] = field(default_factory=list)  # each written CAM's mean activation
    flat: int = 0  # how many written CAMs are flat

    def write(self, folder: Path, cams: Sequence[EncodedCam]) -> None:
        """Writes each CAM as ``folder/NAME`` (an 8-bit grey PNG) and counts it."""
        for name, heatmap, mean_activation, is_flat in cams:
            write_png(folder / name, heatmap)
            self.coverage.append(mean_activation)
            self.flat += is_flat

    def report(self, tiles: int, target_layer: str) -> dict[str, float]:
        """Warns when some CAMs are flat; returns the stage's metrics (``cam.*``) for ``tiles`` tiles."""
        if self.flat:
            # A flat CAM thresholds to an empty pseudo-mask; usually the tile is too small for the layer.
            LOGGER.warning(
                "%d of %d CAMs are flat (no activation for the class); if tiles are small, %s may be 1x1 "
                "there: use larger tiles or an earlier cam.target_layer",
                self.flat,
                tiles,
                target_layer,
            )
        return {"cam.tiles": tiles, "cam.flat_tiles": self.flat, "cam.mean_activation": float(np.mean(self.coverage))}


def estimate_from_folder(
    classifier: nn.Module,
    tiles: list[Tile],
    normalized: Path,
    device: torch.device,
    preprocessing: Mapping[str, Any] | None = None,
    reference_quantile: float = 0.5,
    batch_size: int = 16,
    crop_size: int | None = None,
) -> NormalTissueEstimate:
    """:func:`~weakseg.normal_tissue.estimate_normal_tissue_fraction` over ``tiles`` of a normalized folder.

    Reads ``normalized/images/NAME`` in :func:`same_size_batches` and ``normalized/tissue/NAME`` beside them.
    ``crop_size`` is the crop side the classifier was trained on (None: whole tiles), which says how its
    evidence is measured (:func:`~weakseg.normal_tissue.tissue_evidence`).
    """
    values: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for batch_tiles, images in same_size_batches(tiles, normalized / "images", batch_size):
        tissue = np.stack([read_mask(normalized / "tissue" / tile.name) for tile in batch_tiles])
        evidence = tissue_evidence(classifier, images, tissue, device, preprocessing, crop_size)
        for tile, tile_evidence in zip(batch_tiles, evidence, strict=True):
            values[tile.positive].append(tile_evidence)
    estimate = estimate_normal_tissue_fraction(values[False], values[True], reference_quantile)
    return dataclasses.replace(estimate, crop_size=crop_size)


def write_normal_tissue_estimate(
    model: nn.Module,
    params: StageParams,
    normalized: Path,
    output: Path,
    device: torch.device,
    preprocessing: Mapping[str, Any] | None,
    tracker: StageRun | None = None,
) -> NormalTissueEstimate:
    """Writes ``output`` (JSON): the normal-tissue share of positive tiles (:mod:`weakseg.normal_tissue`).

    Measured on the classifier's validation split (``split`` params): tiles it did not train on, so that
    neither class's evidence is inflated by memorisation. Test tiles are never read. A classifier trained on
    crops (``classifier.crop_size``) is measured on crops of that size.
    """
    tiles = read_annotations(normalized / "annotations.csv", params.data.positive_label)
    split = params.split
    try:
        _, validation = split_train_validation(partition(tiles, "train"), split.validation_fraction, split.seed)
    except ValueError:  # too few train tiles for a validation split: no estimate (the warning below)
        validation = []
    cam = params.cam
    estimate = estimate_from_folder(
        model,
        validation,
        normalized,
        device,
        preprocessing,
        cam.normal_reference_quantile,
        cam.batch_size,
        params.classifier.crop_size,
    )
    write_json(output, dataclasses.asdict(estimate))
    if tracker is not None:
        tracker.log_metrics({"normal_tissue_fraction": estimate.normal_tissue_fraction}, prefix="cam.")
    if min(estimate.positive_tiles, estimate.negative_tiles) < MIN_REFERENCE_TILES:
        LOGGER.warning(
            "normal-tissue estimate: %d positive and %d negative validation tiles with tissue, fewer than %d of "
            "a class; normal_tissue_fraction is 0 (background_quantile: auto sets no background seeds)",
            estimate.positive_tiles,
            estimate.negative_tiles,
            MIN_REFERENCE_TILES,
        )
    LOGGER.info("normal-looking share of a positive tile's tissue: %.3f", estimate.normal_tissue_fraction)
    return estimate
