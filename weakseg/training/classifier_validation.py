"""The classifier's validation: logits of a split (in one process or gathered from every rank), its loss and
metrics, and the decision threshold chosen on it.

Under ``torch.distributed`` every rank scores its strided share and gathers every logit, so the metrics,
the best epoch and the decision threshold are the same on all ranks. Nothing here writes a file.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from weakseg.distributed import DistributedContext, gather_objects, shard, unshard
from weakseg.metrics import ThresholdCalibration, calibrate_threshold, classification_scores
from weakseg.training.classifier_data import build_eval_loader
from weakseg.training.common import autocast
from weakseg.training.datasets import TileDataset


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: DataLoader, device: torch.device, mixed_precision: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every tile of ``loader``, in loader order, on the CPU (float32).

    Under DDP, these are what the ranks gather before computing metrics.
    """
    model.eval()
    all_logits: list[torch.Tensor] = []
    all_labels: list[torch.Tensor] = []
    for images, labels in loader:
        with autocast(device, mixed_precision):
            logits = model(images.to(device))
        all_logits.append(logits.float().reshape(-1).cpu())
        all_labels.append(labels.float().reshape(-1))
    if not all_logits:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(all_logits), torch.cat(all_labels)


def distributed_predict_logits(
    model: nn.Module,
    dataset: TileDataset,
    batch_size: int,
    context: DistributedContext,
    num_workers: int = 0,
    mixed_precision: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`predict_logits` of the whole ``dataset``, each rank scoring its strided share.

    Every rank gets every logit, in dataset order, so metrics and decisions are the same on all ranks.
    ``model`` is the bare model, not its DDP wrapper (ranks run different numbers of batches here).
    """
    indices = shard(range(len(dataset)), context)
    share = torch.utils.data.Subset(dataset, indices)
    local_batch = max(1, batch_size // context.world_size)
    loader = build_eval_loader(share, local_batch, num_workers, context.device.type == "cuda")  # type: ignore[arg-type]
    logits, labels = predict_logits(model, loader, context.device, mixed_precision)
    gathered = gather_objects((logits.tolist(), labels.tolist()), context)
    all_logits = unshard([part[0] for part in gathered], len(dataset))
    all_labels = unshard([part[1] for part in gathered], len(dataset))
    return torch.tensor(all_logits, dtype=torch.float32), torch.tensor(all_labels, dtype=torch.float32)


def validation_scores(logits: torch.Tensor, labels: torch.Tensor, loss_function: nn.Module) -> dict[str, float]:
    """Loss and classification metrics of a whole validation split's logits.

    The loss is computed over the whole split at once (the Focal Tversky term is a set-level loss, so
    this does not depend on the batch size).
    """
    loss = float(loss_function(logits, labels))
    probabilities = torch.sigmoid(logits).numpy().astype(np.float64)
    scores = classification_scores(labels.numpy() > 0.5, probabilities)
    return {"loss": loss, **scores}


def majority_class_rate(labels: np.ndarray | list[bool]) -> float:
    """The accuracy of always predicting the more frequent class."""
    labels_array = np.asarray(labels, dtype=bool)
    if labels_array.size == 0:
        return 0.0
    positives = float(labels_array.mean())
    return max(positives, 1.0 - positives)


def choose_decision(
    labels: torch.Tensor, logits: torch.Tensor, rule: str = "balanced_accuracy"
) -> ThresholdCalibration:
    """The decision threshold of validation ``logits`` against 0/1 ``labels`` by ``rule``, and its scores.

    :func:`weakseg.metrics.choose_decision_threshold` states the rules;
    :func:`weakseg.metrics.choose_balanced_accuracy_threshold` the tie rule and when 0.5 is kept (a split of
    one class, or no cut better than chance).
    """
    positives = labels.numpy().reshape(-1) > 0.5
    probabilities = torch.sigmoid(logits.float()).numpy().astype(np.float64).reshape(-1)
    return calibrate_threshold(positives, probabilities, rule)


def calibrate_decision(
    model: nn.Module,
    validation_dataset: TileDataset,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    context: DistributedContext | None = None,
    rule: str = "balanced_accuracy",
) -> ThresholdCalibration:
    """Chooses the (best) model's decision threshold on the validation split by ``rule`` and scores it there.

    The model runs in float32 without autocast, as ``evaluate`` and ``predict`` run the saved checkpoint;
    under a distributed ``context`` every rank scores its share and all get the same answer. ``model`` is
    the bare model, not its DDP wrapper.
    """
    if context is not None and context.enabled:
        logits, labels = distributed_predict_logits(model, validation_dataset, batch_size, context, num_workers)
    else:
        loader = build_eval_loader(validation_dataset, batch_size, num_workers, device.type == "cuda")
        logits, labels = predict_logits(model, loader, device)
    return choose_decision(labels, logits, rule)
