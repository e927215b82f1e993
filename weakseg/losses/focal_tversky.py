"""Focal Tversky loss (Abraham & Khan 2019) on a batch of tile-level probabilities.

Convention used here (the one of the paper and of its reference implementation):

* soft counts over the whole batch, with ``p`` the predicted probability of the positive class and ``y``
  the 0/1 label of each tile::

      TP = sum(p * y)    FN = sum((1 - p) * y)    FP = sum(p * (1 - y))

* the Tversky index, with a smoothing constant ``s`` added to numerator and denominator so that a batch
  without positive tiles is defined (``TI = 1`` when nothing is predicted positive either)::

      TI = (TP + s) / (TP + alpha * FN + beta * FP + s)

* the loss ``(1 - TI) ** (1 / gamma)``. With ``gamma > 1`` the exponent is below 1, which raises the
  loss (and its gradient) of batches that are already fairly good, focusing training on the hard ones.

``alpha`` weighs false negatives and ``beta`` false positives; ``alpha = 0.7, beta = 0.3, gamma = 4/3``
are the paper's values. ``alpha = beta = 0.5`` and ``gamma = 1`` give the soft Dice loss.

Relation to ``segmentation_models_pytorch.losses.TverskyLoss`` (tested to agree within 1e-6 on random
batches): ``FocalTverskyLoss(alpha, beta, gamma, smooth)`` on logits of shape ``(N, 1)`` equals
``TverskyLoss(mode="binary", from_logits=True, alpha=beta, beta=alpha, gamma=1 / gamma, smooth=smooth)``.
The names are swapped (smp's ``alpha`` weighs false positives) and smp raises ``1 - TI`` to ``gamma``
itself, not to ``1 / gamma``. smp's binary mode also pools the whole batch into one index, as here. Two
differences are by design:

* smp sets the loss to 0 for a batch without a positive target; here the smoothed index still
  punishes false positives in such a batch (a classifier batch may hold only negative tiles);
* smp clamps the index's denominator at ``1e-7``, this module clamps ``1 - TI`` at ``1e-7`` so that the
  gradient stays finite for a perfect batch; on ordinary batches neither clamp acts.
"""

from __future__ import annotations

import torch
from torch import nn

#: Below this, ``1 - TI`` is clamped: ``x ** (1 / gamma)`` has an infinite slope at 0 when ``gamma > 1``.
_MIN_COMPLEMENT = 1e-7


def tversky_index(
    probabilities: torch.Tensor, targets: torch.Tensor, alpha: float, beta: float, smooth: float = 1.0
) -> torch.Tensor:
    """The soft Tversky index of a batch (a scalar tensor).

    Args:
        probabilities: predicted probabilities of the positive class, any shape.
        targets: 0/1 labels of the same shape.
        alpha: weight of the false negatives.
        beta: weight of the false positives.
        smooth: added to numerator and denominator (see the module docstring).

    Raises:
        ValueError: if the shapes differ.
    """
    if probabilities.shape != targets.shape:
        raise ValueError(
            f"probabilities shape {tuple(probabilities.shape)} differs from targets {tuple(targets.shape)}"
        )
    probabilities = probabilities.float().reshape(-1)
    targets = targets.float().reshape(-1)
    true_positive = (probabilities * targets).sum()
    false_negative = ((1.0 - probabilities) * targets).sum()
    false_positive = (probabilities * (1.0 - targets)).sum()
    return (true_positive + smooth) / (true_positive + alpha * false_negative + beta * false_positive + smooth)


def focal_tversky_loss(
    probabilities: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.7,
    beta: float = 0.3,
    gamma: float = 1.33,
    smooth: float = 1.0,
) -> torch.Tensor:
    """``(1 - TI) ** (1 / gamma)`` of a batch of probabilities (see the module docstring).

    Returns:
        A scalar tensor in ``[0, 1]``.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    index = tversky_index(probabilities, targets, alpha, beta, smooth)
    return (1.0 - index).clamp_min(_MIN_COMPLEMENT) ** (1.0 / gamma)


class FocalTverskyLoss(nn.Module):
    """Focal Tversky loss on logits of a binary tile classifier (sigmoid applied inside, in float32).

    Args:
        alpha: weight of the false negatives.
        beta: weight of the false positives.
        gamma: focal parameter; the loss is ``(1 - TI) ** (1 / gamma)``.
        smooth: smoothing constant of the Tversky index.
    """

    def __init__(self, alpha: float = 0.7, beta: float = 0.3, gamma: float = 1.33, smooth: float = 1.0) -> None:
        super().__init__()
        if alpha < 0 or beta < 0 or alpha + beta == 0:
            raise ValueError(f"alpha ({alpha}) and beta ({beta}) must be >= 0 and not both 0")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of one batch of logits against 0/1 targets of the same shape."""
        return focal_tversky_loss(
            torch.sigmoid(logits.float()), targets, self.alpha, self.beta, self.gamma, self.smooth
        )
