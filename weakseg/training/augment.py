"""Albumentations pipelines shared by both training stages.

The same pipeline transforms a tile and its mask identically (albumentations applies geometric
transforms to ``mask`` and colour transforms to the image only). Each pipeline is seeded, so a run
repeats exactly.
"""

from __future__ import annotations

import albumentations as A

from weakseg.params import AugmentParams


def build_augmentation(params: AugmentParams, seed: int, crop_size: int | None = None) -> A.Compose:
    """Flips, 90-degree rotations and mild colour jitter (H&E tiles have no canonical orientation).

    Args:
        params: which transforms and how strong.
        seed: the pipeline's seed; re-seed per epoch for different but repeatable draws.
        crop_size: first cut a random ``crop_size`` square out of the tile (None: keep the whole tile).
    """
    transforms: list[A.BasicTransform] = []
    if crop_size is not None:
        transforms.append(A.RandomCrop(crop_size, crop_size))
    if params.flips:
        transforms += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if params.rotate90:
        transforms.append(A.RandomRotate90(p=0.5))
    if params.color_jitter > 0 or params.hue_jitter > 0:
        transforms.append(
            A.ColorJitter(
                brightness=params.color_jitter,
                contrast=params.color_jitter,
                saturation=params.color_jitter,
                hue=params.hue_jitter,
                p=0.8,
            )
        )
    return A.Compose(transforms, seed=seed)
