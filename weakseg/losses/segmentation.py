"""The segmenter's loss: Dice + Lovasz on the mask, plus BCE on the tile-level head.

Both mask terms come from segmentation_models.pytorch in binary mode and take logits. Both are pooled
over the whole batch (not averaged per image), so a negative tile in a mixed batch adds its false
positives to the pooled denominator and receives a real gradient.

The one case smp does not cover is a batch with no foreground pixel at all (a batch of negative tiles,
common late in the curriculum): smp's ``DiceLoss`` multiplies the loss of a class absent from the target
by zero, whatever ``smooth`` and ``eps`` are, so the Dice term would silently vanish for that batch. For
such a batch the Dice term is instead smp's own ``DiceLoss`` on the *background* class (logits negated,
target complemented). Its value is ``sum(p) / (2 * N - sum(p))`` for ``N`` pixels of foreground
probability ``p``: zero only when nothing is predicted, finite, and its gradient lowers every pixel's
foreground probability. The Lovasz hinge needs no such care (on an empty target it penalises the most
confident false positive), and the classification BCE is defined for every label.

Target pixels equal to :data:`IGNORE_INDEX` (the pseudo-masks' uncertain band, ``refine.background_quantile``)
take no part in either mask term: both smp losses get ``ignore_index``, and a batch counts as having no
foreground when none of its non-ignored pixels is foreground. Without an ignored pixel every term is
bit-identical to the same losses without ``ignore_index``.

Two optional terms train from the tile label itself (:mod:`weakseg.losses.constraints`): a
multiple-instance term and a size constraint on positive tiles. Their region is each tile's pixels not
known to be background: on a positive tile its foreground and ignored pixels (the tissue, when the
pseudo-masks mark all of it foreground or ignored), on a negative tile every pixel. With both weights 0
(the default) the loss is exactly Dice + Lovasz + BCE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, LovaszLoss
from torch import nn

from weakseg.losses.constraints import multiple_instance_loss, size_constraint_loss

# The target value of a pixel that no mask term sees (uint8 masks: 0 background, 1 foreground, 255 ignored).
IGNORE_INDEX = 255


@dataclass(frozen=True)
class SegmentationLossWeights:
    """The weight of each term, and the settings of the two tile-label terms (``segmenter.loss``)."""

    dice: float = 1.0
    lovasz: float = 0.5
    classification: float = 0.2
    multiple_instance: float = 0.0
    multiple_instance_top_fraction: float = 0.2
    size: float = 0.0
    size_lower: float = 0.0
    size_upper: float = 1.0


@dataclass(frozen=True)
class SegmentationLossTerms:
    """The weighted total and its unweighted parts (for logging)."""

    total: torch.Tensor
    dice: torch.Tensor
    lovasz: torch.Tensor
    classification: torch.Tensor
    multiple_instance: torch.Tensor
    size: torch.Tensor


def label_region(target_masks: torch.Tensor, target_labels: torch.Tensor) -> torch.Tensor:
    """The pixels each tile's label speaks about: not known background on a positive tile, all on a negative.

    Args:
        target_masks: ``(N, ...)`` targets in {0, 1, :data:`IGNORE_INDEX`}.
        target_labels: ``(N,)`` tile labels in {0, 1}.

    Returns:
        A boolean tensor shaped like ``target_masks``.
    """
    negative = (target_labels.reshape(-1) < 0.5).reshape(-1, *([1] * (target_masks.dim() - 1)))
    return (target_masks != 0) | negative


class SegmentationLoss(nn.Module):
    """``dice * Dice + lovasz * Lovasz`` on mask logits plus ``classification * BCE`` on tile logits,
    plus, when weighted, the multiple-instance and size-constraint terms.

    Args:
        weights: the term weights (``segmenter.loss`` in params.yaml).
    """

    def __init__(self, weights: SegmentationLossWeights) -> None:
        super().__init__()
        self.weights = weights
        # Batch-pooled (smp's binary default), so a mixed batch scores negatives' false positives too.
        self.dice_loss = DiceLoss(mode="binary", from_logits=True, ignore_index=IGNORE_INDEX)
        self.lovasz_loss = LovaszLoss(mode="binary", per_image=False, from_logits=True, ignore_index=IGNORE_INDEX)

    def terms(
        self,
        mask_logits: torch.Tensor,
        label_logits: torch.Tensor,
        target_masks: torch.Tensor,
        target_labels: torch.Tensor,
    ) -> SegmentationLossTerms:
        """Every term of the loss for one batch.

        Args:
            mask_logits: ``(N, 1, H, W)`` foreground logits.
            label_logits: ``(N, 1)`` or ``(N,)`` tile logits of the auxiliary head.
            target_masks: ``(N, 1, H, W)`` or ``(N, H, W)`` masks in {0, 1}, or :data:`IGNORE_INDEX` where the
                mask terms must not look.
            target_labels: ``(N,)`` tile labels in {0, 1}.

        Returns:
            The weighted total and the unweighted terms, all float32 scalars.
        """
        # Losses in float32 even under bf16 autocast: the Lovasz sort and Dice ratios lose too much in bf16.
        mask_logits = mask_logits.float()
        target_masks = target_masks.float().reshape(mask_logits.shape)
        ignored = target_masks == IGNORE_INDEX
        if bool(((target_masks > 0.5) & ~ignored).any()):
            dice = self.dice_loss(mask_logits, target_masks)
        else:
            # The background class, ignored pixels kept ignored.
            dice = self.dice_loss(-mask_logits, torch.where(ignored, target_masks, 1.0 - target_masks))
        lovasz = self.lovasz_loss(mask_logits, target_masks)
        classification = F.binary_cross_entropy_with_logits(
            label_logits.float().reshape(-1), target_labels.float().reshape(-1)
        )
        total = (
            self.weights.dice * dice + self.weights.lovasz * lovasz + self.weights.classification * classification
        )
        multiple_instance = size = torch.zeros((), dtype=total.dtype, device=total.device)
        if self.weights.multiple_instance > 0 or self.weights.size > 0:
            region = label_region(target_masks, target_labels)
            if self.weights.multiple_instance > 0:
                multiple_instance = multiple_instance_loss(
                    mask_logits, region, target_labels, self.weights.multiple_instance_top_fraction
                )
                total = total + self.weights.multiple_instance * multiple_instance
            if self.weights.size > 0:
                size = size_constraint_loss(
                    mask_logits, region, target_labels, self.weights.size_lower, self.weights.size_upper
                )
                total = total + self.weights.size * size
        return SegmentationLossTerms(
            total=total,
            dice=dice,
            lovasz=lovasz,
            classification=classification,
            multiple_instance=multiple_instance,
            size=size,
        )

    def forward(
        self,
        mask_logits: torch.Tensor,
        label_logits: torch.Tensor,
        target_masks: torch.Tensor,
        target_labels: torch.Tensor,
    ) -> torch.Tensor:
        """The weighted total loss of one batch (see :meth:`terms`)."""
        return self.terms(mask_logits, label_logits, target_masks, target_labels).total
