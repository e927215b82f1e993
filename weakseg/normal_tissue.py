"""How much of a positive tile's tissue looks normal: the share of background seeds, from image labels only.

A fixed background quantile assumes the lesion's share of a positive tile. This module measures it instead,
on the validation split (tiles the classifier did not train on), with the classifier's own local evidence:
its class activation map in logit units (Zhou et al. 2016: the ``fc`` weights applied at each position of
the last feature map, plus the bias, so that the tile's logit is the mean of the map). Negative tiles say
what normal tissue scores; the share of a positive tile's tissue that scores as low as normal tissue is,
if normal tissue scores alike in both classes, that share of its normal tissue.

Where the tile's class is legible in its normal tissue too (the lesion changes the whole tile's look, or
the classes were stained apart), a positive tile's normal tissue scores above the negatives' and the
estimate falls towards 0: no background seeds, rather than wrong ones.

A classifier trained on crops (``classifier.crop_size``) has a receptive field as large as its crop, so
every position of its whole-tile map sees a lesion that lies within a crop's reach, and normal tissue near a
lesion scores as lesion. Its evidence is measured on its own input instead (:func:`crop_evidence_maps`):
the tile is cut into overlapping crops, and each pixel takes the *lowest* logit of the crops that hold it.
That is the multiple-instance reading of the crop labels the classifier learnt: a crop is negative only if
all of its tissue is, so a pixel inside any crop that scores as normal is normal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weakseg.cam import images_to_model_input
from weakseg.errors import UserInputError
from weakseg.sliding_window import window_starts

# Fewer validation tiles of a class than this give no estimate (0: no background seeds). On a set of
# 10 positives to 1 negative, a 20 % validation split of 170 positive train tiles holds 3 negatives.
MIN_REFERENCE_TILES = 10


@dataclass(frozen=True)
class NormalTissueEstimate:
    """The estimate and what it was made from (``metrics/cams.json``).

    Attributes:
        normal_tissue_fraction: estimated share of a positive tile's tissue that is normal, in [0, 1].
        reference_quantile: the quantile of the negatives' tissue evidence used as the cut.
        reference_cut: that cut, in logit units (``None`` without tiles of both classes).
        below_cut_fraction: mean share of a positive tile's tissue scoring below the cut.
        positive_tiles: validation positive tiles measured.
        negative_tiles: validation negative tiles measured.
        crop_size: the crops the evidence was measured on (:func:`crop_evidence_maps`); None: whole tiles.
    """

    normal_tissue_fraction: float
    reference_quantile: float
    reference_cut: float | None
    below_cut_fraction: float
    positive_tiles: int
    negative_tiles: int
    crop_size: int | None = None


def class_evidence_maps(classifier: nn.Module, images: torch.Tensor, upsample: bool = True) -> torch.Tensor:
    """The classifier's positive-class logit at each position, upsampled to the input size.

    Args:
        classifier: a torchvision ResNet with a one-logit ``fc`` head (``weakseg.models.build_classifier``).
        images: normalized ``(N, 3, H, W)``.
        upsample: bilinearly to ``(H, W)``; else the feature map's own grid.

    Returns:
        ``(N, H, W)`` float maps (or the feature grid's); on the feature grid, each map's mean is the tile's logit.

    Raises:
        UserInputError: if ``classifier.fc`` is not a one-logit ``nn.Linear``.
    """
    fc = getattr(classifier, "fc", None)
    if not isinstance(fc, nn.Linear) or fc.out_features != 1:
        raise UserInputError(
            f"class_evidence_maps: expected a classifier whose fc is a one-logit nn.Linear, got {fc!r}"
        )
    body = nn.Sequential(*(module for name, module in classifier.named_children() if name not in ("avgpool", "fc")))
    features = body(images)
    logits = F.conv2d(features, fc.weight[:, :, None, None], fc.bias)
    if not upsample:
        return logits[:, 0]
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def _crop_logits(
    classifier: nn.Module, images: torch.Tensor, crop_size: int, stride: int | None, batch_size: int
) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """The classifier's logit of every overlapping crop of each image: ``(N, crops)`` and the crops' boxes.

    The boxes are ``(top, left, height, width)``; a quarter of the crop is the largest step between them by
    default (:func:`~weakseg.sliding_window.window_starts` spreads them evenly, the last flush with the edge).
    """
    height, width = images.shape[-2:]
    overlap = crop_size - (stride or max(crop_size // 4, 1))
    boxes = [
        (top, left, min(crop_size, height), min(crop_size, width))
        for top in window_starts(height, crop_size, overlap)
        for left in window_starts(width, crop_size, overlap)
    ]
    # Crops are cut a batch at a time (image-major, as flattening an (N, crops) stack would order them), so a
    # large image never holds all its crops in memory at once.
    total = len(images) * len(boxes)

    def crop_batch(start: int) -> torch.Tensor:
        crops = []
        for index in range(start, min(start + batch_size, total)):
            image, box = divmod(index, len(boxes))
            top, left, h, w = boxes[box]
            crops.append(images[image, :, top : top + h, left : left + w])
        return torch.stack(crops)

    logits = torch.cat([classifier(crop_batch(start)) for start in range(0, total, batch_size)])
    return logits.reshape(len(images), len(boxes)).float(), boxes


def crop_evidence_maps(
    classifier: nn.Module, images: torch.Tensor, crop_size: int, stride: int | None = None, batch_size: int = 256
) -> torch.Tensor:
    """Per pixel, the lowest positive-class logit of the classifier's crops that contain it.

    Args:
        classifier: a one-logit classifier that was trained on crops of ``crop_size``.
        images: normalized ``(N, 3, H, W)``.
        crop_size: the crop side in pixels; an image no larger than it is one crop (its own logit everywhere).
        stride: the largest step between crops (:func:`~weakseg.sliding_window.window_starts` spreads them
            evenly, the last flush with the edge); a quarter of the crop by default.
        batch_size: crops per forward pass.

    Returns:
        ``(N, H, W)`` float maps.
    """
    logits, boxes = _crop_logits(classifier, images, crop_size, stride, batch_size)
    maps = torch.full((len(images), *images.shape[-2:]), float("inf"), device=images.device)
    for index, (top, left, h, w) in enumerate(boxes):
        window = maps[:, top : top + h, left : left + w]
        torch.minimum(window, logits[:, index, None, None], out=window)
    return maps


def mean_crop_evidence_maps(
    classifier: nn.Module, images: torch.Tensor, crop_size: int, stride: int | None = None, batch_size: int = 256
) -> torch.Tensor:
    """Per pixel, the mean positive-class logit of the classifier's crops that contain it.

    A heatmap of a patch classifier slid over the tile, the usual localisation map of computational
    pathology: with crops smaller than those the classifier trained on, a crop of normal tissue next to a
    lesion holds no lesion, and its pixels score low (the CAM of a whole tile, by contrast, blurs over the
    receptive field of its layer).

    Args:
        classifier: a one-logit classifier.
        images: normalized ``(N, 3, H, W)``.
        crop_size: the crop side in pixels; an image no larger than it is one crop (its own logit everywhere).
        stride: the largest step between crops; a quarter of the crop by default.
        batch_size: crops per forward pass.

    Returns:
        ``(N, H, W)`` float maps.
    """
    logits, boxes = _crop_logits(classifier, images, crop_size, stride, batch_size)
    sums = torch.zeros((len(images), *images.shape[-2:]), device=images.device)
    counts = torch.zeros(images.shape[-2:], device=images.device)
    for index, (top, left, h, w) in enumerate(boxes):
        sums[:, top : top + h, left : left + w] += logits[:, index, None, None]
        counts[top : top + h, left : left + w] += 1
    return sums / counts


def estimate_normal_tissue_fraction(
    negative_values: Sequence[np.ndarray],
    positive_values: Sequence[np.ndarray],
    reference_quantile: float = 0.5,
    min_tiles: int = MIN_REFERENCE_TILES,
) -> NormalTissueEstimate:
    """Share of a positive tile's tissue that looks normal, from tissue evidence of both classes.

    The cut is the ``reference_quantile`` of every negative tile's tissue values pooled; each positive tile's
    share of tissue below it, averaged over tiles, is divided by ``reference_quantile`` (only that share of
    normal tissue falls below its own quantile) and clipped to [0, 1].

    Args:
        negative_values: per negative tile, the evidence at its tissue pixels (1-D).
        positive_values: per positive tile, the same.
        reference_quantile: in (0, 1); 0.5 cuts at the median of normal tissue.
        min_tiles: fewer tiles with tissue than this in either class give 0 (a handful of negative tiles
            does not say what normal tissue scores).

    Returns:
        The estimate; 0 when either class has fewer than ``min_tiles`` tiles with tissue.
    """
    if not 0.0 < reference_quantile < 1.0:
        raise ValueError(f"reference_quantile must be in (0, 1), got {reference_quantile}")
    negatives = [np.ravel(values) for values in negative_values if np.size(values)]
    positives = [np.ravel(values) for values in positive_values if np.size(values)]
    if len(negatives) < max(min_tiles, 1) or len(positives) < max(min_tiles, 1):
        return NormalTissueEstimate(0.0, reference_quantile, None, 0.0, len(positives), len(negatives))
    cut = float(np.quantile(np.concatenate(negatives), reference_quantile))
    below = float(np.mean([np.mean(values < cut) for values in positives]))
    fraction = float(np.clip(below / reference_quantile, 0.0, 1.0))
    return NormalTissueEstimate(fraction, reference_quantile, cut, below, len(positives), len(negatives))


def tissue_evidence(
    classifier: nn.Module,
    images: np.ndarray,
    tissue: np.ndarray,
    device: torch.device,
    preprocessing: Mapping[str, Any] | None = None,
    crop_size: int | None = None,
) -> list[np.ndarray]:
    """Per tile, the classifier's evidence at its tissue pixels.

    Args:
        classifier: the one-logit classifier.
        images: ``(N, H, W, 3)`` uint8 RGB tiles of one size.
        tissue: ``(N, H, W)`` boolean tissue masks.
        device: where the classifier runs.
        preprocessing: the checkpoint's preprocessing record.
        crop_size: the crop side the classifier was trained on (:func:`crop_evidence_maps`); None for a
            classifier trained on whole tiles (:func:`class_evidence_maps`).
    """
    classifier = classifier.to(device).eval()
    inputs = images_to_model_input(images, preprocessing).to(device)
    with torch.no_grad():
        maps = (
            class_evidence_maps(classifier, inputs)
            if crop_size is None
            else crop_evidence_maps(classifier, inputs, crop_size)
        )
    return [evidence[mask] for evidence, mask in zip(maps.float().cpu().numpy(), np.asarray(tissue), strict=True)]
