"""The tile classifier's loss: binary cross-entropy plus Focal Tversky on tile logits.

``classifier.balance: weight`` weights the BCE term's positive tiles by the training split's
negatives / positives (:func:`positive_weight`); the Focal Tversky term is unweighted either way.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weakseg.losses.focal_tversky import FocalTverskyLoss


class ClassificationLoss(nn.Module):
    """``bce_weight * BCE + focal_tversky_weight * FocalTversky`` on tile logits.

    Args:
        bce_weight: weight of the binary cross-entropy (mean over tiles).
        focal_tversky_weight: weight of the Focal Tversky loss (over the batch).
        alpha: Focal Tversky weight of false negatives.
        beta: Focal Tversky weight of false positives.
        gamma: Focal Tversky focal parameter.
        pos_weight: the BCE term's weight of positive tiles (``classifier.balance: weight``); None: 1.
    """

    def __init__(
        self,
        bce_weight: float,
        focal_tversky_weight: float,
        alpha: float,
        beta: float,
        gamma: float,
        pos_weight: float | None = None,
    ) -> None:
        super().__init__()
        self.bce_weight = bce_weight
        self.focal_tversky_weight = focal_tversky_weight
        self.pos_weight = pos_weight
        self.bce = nn.BCEWithLogitsLoss()
        self.focal_tversky = FocalTverskyLoss(alpha, beta, gamma)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The combined loss of logits ``(N,)`` against 0/1 targets ``(N,)``."""
        logits = logits.float().reshape(-1)
        targets = targets.float().reshape(-1)
        loss = logits.new_zeros(())
        if self.bce_weight:
            if self.pos_weight is None:
                bce = self.bce(logits, targets)
            else:  # made on the logits' device: the loss module itself is never moved
                bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=logits.new_tensor(self.pos_weight))
            loss = loss + self.bce_weight * bce
        if self.focal_tversky_weight:
            loss = loss + self.focal_tversky_weight * self.focal_tversky(logits, targets)
        return loss


def positive_weight(labels: np.ndarray | list[bool]) -> float | None:
    """``classifier.balance: weight``'s BCE ``pos_weight``: negatives / positives of the training labels.

    None (no weighting) when either class is absent: there is no ratio to correct.
    """
    labels_array = np.asarray(labels, dtype=bool).reshape(-1)
    positives = int(labels_array.sum())
    negatives = int(labels_array.size - positives)
    if positives == 0 or negatives == 0:
        return None
    return negatives / positives
