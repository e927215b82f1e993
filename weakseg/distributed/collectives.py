"""Collective operations over the ranks: sums, gathers (some differentiable) and buffer averaging.

Every function takes the process's :class:`~weakseg.distributed.process_group.DistributedContext` and
does the one-process thing (returns its input, or nothing) when the run is not distributed. Reductions
run on the GPU under NCCL and on the CPU under gloo.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_distributed
from torch import nn

from weakseg.distributed.process_group import DistributedContext


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102 (autograd protocol)
        result = tensor.clone()
        torch_distributed.all_reduce(result, op=torch_distributed.ReduceOp.SUM)
        return result

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> torch.Tensor:  # noqa: D102 (autograd protocol)
        # Every rank's loss depends on every rank's contribution, so each contribution's gradient is the
        # sum of the ranks' gradients of the reduced value.
        result = gradient.contiguous().clone()
        torch_distributed.all_reduce(result, op=torch_distributed.ReduceOp.SUM)
        return result


class _AllGather(torch.autograd.Function):
    """Concatenation over ranks of equally shaped tensors, with gradients.

    A rank's gradient is the sum over the ranks of the gradients of its slice.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102 (autograd protocol)
        world_size = torch_distributed.get_world_size()
        ctx.rank, ctx.rows = torch_distributed.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        torch_distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> torch.Tensor:  # noqa: D102 (autograd protocol)
        summed = gradient.contiguous().clone()
        torch_distributed.all_reduce(summed, op=torch_distributed.ReduceOp.SUM)
        return summed[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def differentiable_all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``tensor``, through which gradients flow back to every rank's share."""
    return _AllReduceSum.apply(tensor)


def _reduction_device(context: DistributedContext) -> torch.device:
    """NCCL reduces tensors on the GPU; gloo on the CPU."""
    return context.device if torch_distributed.get_backend() == "nccl" else torch.device("cpu")


def gather_batch(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The global batch, from every rank's strided share (:func:`shard`), in the one-process order.

    Shares may differ in length by one (earlier ranks hold the extra rows, as strided shares do).
    Gradients flow back to each rank's share summed over the ranks, so a loss that every rank computes
    on the global batch, averaged over the ranks by DDP, has the gradient of one process computing it
    once: set-level losses (Focal Tversky, Dice, Lovasz) then see the global batch, as in one process.

    Args:
        tensor: this rank's rows, ``(n, ...)``.
        context: the process group position.

    Returns:
        ``(sum of n, ...)``: row ``i`` is row ``i // world_size`` of rank ``i % world_size``.
    """
    if not context.enabled:
        return tensor
    device = _reduction_device(context)
    local_rows = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device)
    all_rows = [torch.zeros_like(local_rows) for _ in range(context.world_size)]
    torch_distributed.all_gather(all_rows, local_rows)
    rows = [int(count) for count in all_rows]
    largest = max(rows)
    padded = torch.cat([tensor, tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))])
    gathered = _AllGather.apply(padded.to(device)).to(tensor.device)
    total = sum(rows)
    # Row i of the one-process batch is row i // world_size of rank i % world_size's padded share.
    order = [(index % context.world_size) * largest + index // context.world_size for index in range(total)]
    return gathered[torch.tensor(order, dtype=torch.int64, device=tensor.device)]


@torch.no_grad()
def average_buffers(model: nn.Module, context: DistributedContext) -> None:
    """Averages floating-point buffers (batch-norm running statistics) over the ranks, in place.

    With global batch statistics the ranks' buffers agree up to float rounding already; averaging before
    validation makes them identical, so every rank scores with the same model. Integer buffers
    (``num_batches_tracked``) count equal steps on every rank and stay as they are.
    """
    if not context.enabled:
        return
    device = _reduction_device(context)
    for buffer in model.buffers():
        if buffer.is_floating_point():
            moved = buffer.detach().to(device)
            torch_distributed.all_reduce(moved, op=torch_distributed.ReduceOp.SUM)
            buffer.copy_(moved.div_(context.world_size).to(buffer.device))


def all_reduce_sum(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sums a tensor over ranks (a copy; the input is unchanged)."""
    result = values.detach().clone()
    if context.enabled:
        moved = result.to(_reduction_device(context))
        torch_distributed.all_reduce(moved, op=torch_distributed.ReduceOp.SUM)
        result = moved.to(values.device)
    return result


def gather_objects(value: Any, context: DistributedContext) -> list[Any]:
    """Collects one picklable value from every rank, in rank order (``[value]`` when not distributed)."""
    if not context.enabled:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    torch_distributed.all_gather_object(gathered, value)
    return gathered


def barrier(context: DistributedContext) -> None:
    """Waits for every rank."""
    if context.enabled:
        torch_distributed.barrier()
