"""Models for distributed training: batch norm over the global batch, and the DDP wrapper.

Every process normalises with the statistics of the global batch, as one process would: on GPUs through
PyTorch's ``SyncBatchNorm``, on CPU (which ``SyncBatchNorm`` does not support) through
:class:`GlooSyncBatchNorm`, which reduces the statistics with autograd-aware collectives.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as torch_distributed
from torch import nn

from weakseg.distributed.collectives import differentiable_all_reduce_sum
from weakseg.distributed.process_group import DistributedContext


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of the global batch of all ranks (CPU, gloo).

    The mean and the biased variance are sums reduced over the ranks with
    :func:`differentiable_all_reduce_sum`, whose backward pass reduces the gradients too, so the
    gradients equal those of one process holding the whole batch (with DDP's averaging). Running
    statistics use the unbiased global variance, as ``BatchNorm2d`` does; evaluation, and training outside
    a process group, is plain ``BatchNorm2d``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Module's argument name)
        """Normalises ``input`` ``(N, C, H, W)`` with global batch statistics while training."""
        distributed = torch_distributed.is_available() and torch_distributed.is_initialized()
        if not (self.training and distributed and torch_distributed.get_world_size() > 1):
            return super().forward(input)
        channels = input.shape[1]
        reduced_dims = [0, 2, 3]
        count = torch.tensor([float(input.numel() // max(channels, 1))], dtype=input.dtype, device=input.device)
        # Two passes (mean, then squared deviations) are as stable as BatchNorm2d's own computation.
        sums = differentiable_all_reduce_sum(torch.cat([input.sum(reduced_dims), count]))
        total = sums[channels]
        if float(total) <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}"
            )
        mean = sums[:channels] / total
        centred = input - mean.view(1, channels, 1, 1)
        variance = differentiable_all_reduce_sum(centred.pow(2).sum(reduced_dims)) / total
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else float(self.momentum)  # type: ignore[arg-type]
                unbiased = variance.detach() * (total.detach() / (total.detach() - 1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        output = centred * torch.rsqrt(variance + self.eps).view(1, channels, 1, 1)
        if self.affine:
            output = output * self.weight.view(1, channels, 1, 1) + self.bias.view(1, channels, 1, 1)
        return output


def convert_to_gloo_sync_batch_norm(module: nn.Module) -> nn.Module:
    """Replaces every ``BatchNorm2d`` of ``module`` by a :class:`GlooSyncBatchNorm` with its state (in place).

    Returns:
        ``module``, or its replacement when ``module`` itself is a ``BatchNorm2d``.
    """
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlooSyncBatchNorm):
        converted = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        if module.affine:
            converted.weight.requires_grad_(module.weight.requires_grad)
            converted.bias.requires_grad_(module.bias.requires_grad)
        return converted.to(next(module.parameters(), torch.empty(0)).device)
    for name, child in module.named_children():
        replacement = convert_to_gloo_sync_batch_norm(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module


def prepare_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """Makes batch norm use global batch statistics (in place): ``SyncBatchNorm`` on GPUs, else gloo's."""
    if not context.enabled:
        return model
    if context.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return convert_to_gloo_sync_batch_norm(model)


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (the model itself when not distributed).

    Only parameters that require a gradient when this is called are synchronised, so a caller that
    freezes or unfreezes parameters wraps again.
    """
    if not context.enabled:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    # Batch-norm statistics are global already (prepare_model); broadcasting rank 0's buffers at every
    # step would only cost time. (``forward_sync_buffers`` is the newer name of ``broadcast_buffers``.)
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters:
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
