"""The segmenter's validation: pooled pixel counts and loss sums (added up over the ranks), and the head's
tile threshold chosen on the validation split.

Validation is reduced to sums so that under ``torch.distributed`` each rank scores its share and the
ranks add theirs up before any ratio is taken: every rank then takes the same best-epoch and
early-stopping decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from weakseg.distributed import DistributedContext, all_reduce_sum
from weakseg.losses.segmentation import IGNORE_INDEX, SegmentationLoss
from weakseg.metrics import PixelCounts, ThresholdCalibration, calibrate_threshold
from weakseg.preprocessing import images_to_tensor
from weakseg.training.common import autocast
from weakseg.training.segmenter_data import SegmenterData

PREDICTION_THRESHOLD = 0.5


@dataclass
class ValidationResult:
    """Validation reduced to sums, so processes can add theirs before the ratios are taken."""

    counts: PixelCounts
    loss_sum: float
    tiles: int

    @property
    def loss(self) -> float:
        """Mean loss per validation tile (each batch weighted by its size)."""
        return self.loss_sum / self.tiles if self.tiles else 0.0


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    loss_function: SegmentationLoss,
    device: torch.device,
    mixed_precision: bool,
    threshold: float = PREDICTION_THRESHOLD,
) -> ValidationResult:
    """Pooled pixel counts at ``threshold`` (negatives included) and the summed loss over ``loader``.

    Pixels whose target is ``IGNORE_INDEX`` count in neither the loss nor the pixel counts.
    """
    model.eval()
    counts = PixelCounts()
    loss_sum, tiles = 0.0, 0
    for images, labels, masks in tqdm(loader, desc="validating", leave=False):
        images, labels, masks = images.to(device), labels.to(device), masks.to(device)
        with autocast(device, mixed_precision):
            mask_logits, label_logits = model(images)
        # The losses run in float32 whatever the forward pass ran in (Lovasz sorts, Dice sums).
        mask_logits, label_logits = mask_logits.float(), label_logits.float()
        loss_sum += float(loss_function(mask_logits, label_logits, masks, labels)) * len(images)
        tiles += len(images)
        predicted = (torch.sigmoid(mask_logits.float()) >= threshold).cpu().numpy()
        targets = masks.cpu().numpy()
        counts.add(predicted, targets == 1, where=targets != IGNORE_INDEX)
    return ValidationResult(counts=counts, loss_sum=loss_sum, tiles=tiles)


@torch.no_grad()
def head_probabilities(model: nn.Module, images: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """The classification head's probabilities ``(N,)`` of uint8 tiles ``(N, H, W, 3)``, in eval mode.

    In float32 without autocast: the numbers ``evaluate`` and ``predict`` compute from the saved checkpoint.
    """
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        _, label_logits = model(images_to_tensor(images[start : start + batch_size]).to(device))
        outputs.append(torch.sigmoid(label_logits.float()).reshape(-1).cpu())
    return torch.cat(outputs).numpy().astype(np.float64) if outputs else np.zeros(0, dtype=np.float64)


def calibrate_head(
    model: nn.Module,
    validation: SegmenterData,
    batch_size: int,
    device: torch.device,
    rule: str = "balanced_accuracy",
) -> ThresholdCalibration:
    """Chooses the head's tile threshold on ``validation`` by ``rule`` and scores it there.

    The head learns from BCE on a curriculum that shows negative tiles late and rarely, so its
    probabilities are not calibrated: 0.5 can call every tile positive while the ranking is perfect.
    :func:`weakseg.metrics.choose_decision_threshold` states the rules;
    :func:`weakseg.metrics.choose_balanced_accuracy_threshold` the tie rule and when 0.5 is kept (e.g. a
    validation split of one class).
    """
    scores = head_probabilities(model, validation.images, batch_size, device)
    return calibrate_threshold(validation.positives, scores, rule)


def sum_over_ranks(result: ValidationResult, context: DistributedContext) -> ValidationResult:
    """The validation sums of all ranks added up (the same result on every rank)."""
    if not context.enabled:
        return result
    counts = result.counts
    integers = torch.tensor(
        [counts.true_positive, counts.false_positive, counts.false_negative, counts.true_negative, result.tiles],
        dtype=torch.int64,
    )
    totals = all_reduce_sum(integers, context).tolist()
    loss_sum = float(all_reduce_sum(torch.tensor([result.loss_sum], dtype=torch.float64), context)[0])
    return ValidationResult(
        counts=PixelCounts(
            true_positive=totals[0], false_positive=totals[1], false_negative=totals[2], true_negative=totals[3]
        ),
        loss_sum=loss_sum,
        tiles=totals[4],
    )
