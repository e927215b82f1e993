"""PyTorch distributed training helpers: launching, process groups, sampling, sharding and reductions.

A training stage with ``distributed.processes_per_node > 1`` re-launches itself through PyTorch's elastic
launcher (``python -m torch.distributed.run``, the engine behind ``torchrun``). For several machines the
user starts ``torchrun`` on each node with the standard rendezvous options; the stage then sees the
launcher's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) and does not re-launch.

Only rank 0 writes checkpoints, metrics and MLflow records; every rank computes the same global numbers
because validation counts and predictions are reduced across ranks, so every rank also takes the same
best-epoch and early-stopping decisions (a rank that decided differently would wait forever in the next
collective call).

Batch norm: every process normalises with the statistics of the global batch, as one process would: on
GPUs through PyTorch's ``SyncBatchNorm``, on CPU (which ``SyncBatchNorm`` does not support) through
:class:`GlooSyncBatchNorm`, which reduces the statistics with autograd-aware collectives. So a distributed
run differs from a one-process run with the same global batch only by float summation order and the
per-process augmentation and dropout streams. The training losses are computed on the global batch too
(:func:`gather_batch`), so set-level terms (Focal Tversky, Dice, Lovasz) see what one process would.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as torch_distributed
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from weakseg.errors import UserInputError
from weakseg.training.common import select_device

T = TypeVar("T")


class DistributedLaunchError(UserInputError):
    """Raised when the processes of a re-launched distributed run fail (their messages come first)."""


class DistributedBatchError(UserInputError):
    """Raised when a batch size cannot be split evenly over the processes."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the process group (a single process when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """Whether a process group with more than one process is in use."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs (rank 0)."""
        return self.rank == 0


# ------------------------------------------------------------------------------------------ launching
def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` / ``torch.distributed.run``."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_command(module: str, processes_per_node: int, arguments: Sequence[str] = ()) -> list[str]:
    """The command that runs ``python -m module`` in ``processes_per_node`` processes on this machine.

    ``--standalone`` starts a private rendezvous on a free local port, so two runs on one machine do not
    collide.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes_per_node}",
        "-m",
        module,
        *arguments,
    ]


def _module_search_root(module: str) -> Path | None:
    """The folder that holds ``module``'s top-level package (what must be on ``sys.path`` to import it)."""
    spec = importlib.util.find_spec(module.split(".")[0])
    if spec is None:
        return None
    if spec.submodule_search_locations:  # a package (regular or namespace): the folder above it
        return Path(next(iter(spec.submodule_search_locations))).parent
    return Path(spec.origin).parent if spec.origin else None


def relaunch(module: str, processes_per_node: int, arguments: Sequence[str] = ()) -> int:
    """Runs the stage module under the elastic launcher and returns its exit status.

    Args:
        module: the module to run (``stages.train_classifier``).
        processes_per_node: how many processes to start on this machine.
        arguments: the stage's command-line arguments (``--params``, ``--dvc-yaml``).

    Returns:
        The launcher's exit status (0 when every process succeeded).
    """
    environment = dict(os.environ)
    # Each process gets an equal share of the cores instead of all of them, which would oversubscribe.
    cores = os.cpu_count() or 1
    environment.setdefault("OMP_NUM_THREADS", str(max(1, cores // processes_per_node)))
    # The children import the stage by module name; the working folder may not be the one holding it.
    search_root = _module_search_root(module)
    if search_root is not None:
        existing = environment.get("PYTHONPATH")
        environment["PYTHONPATH"] = os.pathsep.join([str(search_root), *([existing] if existing else [])])
    command = relaunch_command(module, processes_per_node, arguments)
    return subprocess.run(command, env=environment, check=False).returncode


def relaunch_or_fail(
    module: str, processes_per_node: int, arguments: Sequence[str] = (), batch_size: tuple[str, int] | None = None
) -> None:
    """:func:`relaunch`, turning a failed run into a :class:`DistributedLaunchError`.

    Args:
        module: the stage module.
        processes_per_node: how many processes to start on this machine.
        arguments: the stage's command-line arguments.
        batch_size: ``(parameter name, value)`` of the global batch, checked before anything starts.

    Raises:
        DistributedBatchError: if the batch cannot be split evenly over the processes.
        DistributedLaunchError: if any process failed (its own message is above, on stderr).
    """
    if batch_size is not None:
        per_process_batch_size(batch_size[1], processes_per_node, batch_size[0])
    status = relaunch(module, processes_per_node, arguments)
    if status != 0:
        raise DistributedLaunchError(
            f"the {processes_per_node} processes of {module} (distributed.processes_per_node) exited with "
            f"status {status}; the first error above says why"
        )


# ------------------------------------------------------------------------------------ process groups
def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` means NCCL on GPUs and gloo on CPU."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def init_distributed(backend: str = "auto", device_name: str = "auto") -> DistributedContext:
    """Joins the process group when launched by ``torchrun``; otherwise returns a single-process context.

    Args:
        backend: ``auto``, ``gloo`` or ``nccl``.
        device_name: ``auto``, ``cpu`` or ``cuda`` (each process takes the GPU of its local rank).

    Raises:
        RuntimeError: if ``cuda`` is asked for on a machine without a GPU.
    """
    device = select_device(device_name)
    if not launched_by_torchrun():
        return DistributedContext(device=device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"process {local_rank} of this node has no GPU of its own ({torch.cuda.device_count()} visible); "
                f"start at most one process per GPU (distributed.processes_per_node, torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not torch_distributed.is_initialized():
        torch_distributed.init_process_group(backend=resolve_backend(backend, device), rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(context: DistributedContext) -> None:
    """Waits for every rank, then leaves the process group."""
    if torch_distributed.is_available() and torch_distributed.is_initialized():
        if context.enabled:
            torch_distributed.barrier()
        torch_distributed.destroy_process_group()


@contextlib.contextmanager
def leaving_process_group(context: DistributedContext) -> Iterator[DistributedContext]:
    """Leaves the process group (if one was joined) when the ``with`` block ends.

    On success every rank waits for the others first (:func:`shutdown`). On an error the group is
    destroyed without that barrier: the other ranks may never reach it (the launcher stops them once this
    process exits).
    """
    try:
        yield context
    except BaseException:
        if torch_distributed.is_available() and torch_distributed.is_initialized():
            torch_distributed.destroy_process_group()
        raise
    shutdown(context)


# ---------------------------------------------------------------------------------------- batches
def per_process_batch_size(batch_size: int, world_size: int, parameter: str) -> int:
    """The batch of one process, so that the global batch stays ``batch_size``.

    Raises:
        DistributedBatchError: naming ``parameter`` when ``batch_size`` is not a multiple of ``world_size``.
    """
    if batch_size % world_size:
        raise DistributedBatchError(
            f"{parameter}={batch_size} is the global batch and must be a multiple of the {world_size} "
            f"processes (distributed.processes_per_node x nodes); use e.g. "
            f"{max(world_size, batch_size // world_size * world_size)}"
        )
    return batch_size // world_size


def shard(items: Sequence[T], context: DistributedContext) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item from ``rank`` (order preserved).

    Strided shares keep global batches intact: items ``s*B .. s*B+B-1`` of the full order are exactly the
    union of the ranks' step-``s`` batches of ``B / world_size``. Shares differ in length by at most one;
    callers that need equal step counts (DDP) pad with :func:`pad_to_multiple` first.
    """
    return list(items[context.rank :: context.world_size])


def pad_to_multiple(items: Sequence[T], multiple: int) -> list[T]:
    """Repeats items from the start so that the length is a multiple of ``multiple`` (as DistributedSampler)."""
    items = list(items)
    if multiple <= 1 or not items:
        return items
    remainder = (-len(items)) % multiple
    return items + [items[index % len(items)] for index in range(remainder)]


def single_process_order(dataset_size: int, epoch_seed: int) -> list[int]:
    """The tile order a one-process ``DataLoader(shuffle=True, generator=seeded(epoch_seed))`` yields.

    The loader draws its workers' base seed from the generator before the random sampler draws its
    permutation; both draws are replayed so that a distributed epoch sees the same order.
    ``tests/test_distributed.py`` checks this against a real loader, so a change in PyTorch shows up there.
    """
    generator = torch.Generator()
    generator.manual_seed(epoch_seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(dataset_size, generator=generator).tolist()


class SameOrderDistributedSampler(DistributedSampler):
    """A ``DistributedSampler`` whose epochs, put together, are the one-process run's epochs.

    Epoch ``e`` (set with ``set_epoch``) shuffles with ``seed + e``, like ``DistributedSampler``, but in
    the order a one-process loader would use (:func:`single_process_order`). The order is cut to whole
    global batches (``drop_last``) or padded to a multiple of the process count, then split by
    :func:`shard`, so step ``s`` of all ranks together trains on the one-process run's batch ``s``.

    Args:
        dataset_size: tiles in the training set.
        global_batch_size: tiles per optimizer step over all processes.
        drop_last: whether the last incomplete global batch is dropped (as the one-process loader does).
        context: the process group position.
        seed: the run's seed.
    """

    def __init__(
        self, dataset_size: int, global_batch_size: int, drop_last: bool, context: DistributedContext, seed: int
    ) -> None:
        # DistributedSampler only needs len(dataset); a range stands in for the dataset.
        super().__init__(
            range(dataset_size),  # type: ignore[arg-type]
            num_replicas=context.world_size,
            rank=context.rank,
            shuffle=True,
            seed=seed,
            drop_last=drop_last,
        )
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.context = context

    def epoch_order(self) -> list[int]:
        """The whole epoch's order over all ranks (cut or padded as described above)."""
        order = single_process_order(self.dataset_size, self.seed + self.epoch)
        if self.drop_last:
            return order[: len(order) // self.global_batch_size * self.global_batch_size]
        return pad_to_multiple(order, self.context.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(shard(self.epoch_order(), self.context))

    def __len__(self) -> int:
        if self.drop_last:
            return self.dataset_size // self.global_batch_size * self.global_batch_size // self.context.world_size
        return math.ceil(self.dataset_size / self.context.world_size)


# ------------------------------------------------------------------------- differentiable collectives
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


# ---------------------------------------------------------------------------------------- models
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
        count = torch.tensor(
            [float(input.numel() // max(channels, 1))], dtype=input.dtype, device=input.device
        )
        # Two passes (mean, then squared deviations) are as stable as BatchNorm2d's own computation.
        sums = differentiable_all_reduce_sum(torch.cat([input.sum(reduced_dims), count]))
        total = sums[channels]
        if float(total) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}")
        mean = sums[:channels] / total
        centred = input - mean.view(1, channels, 1, 1)
        variance = differentiable_all_reduce_sum(centred.pow(2).sum(reduced_dims)) / total
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
                momentum = (
                    1.0 / float(self.num_batches_tracked) if self.momentum is None else float(self.momentum)
                )
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


def _reduction_device(context: DistributedContext) -> torch.device:
    """NCCL reduces tensors on the GPU; gloo on the CPU."""
    return context.device if torch_distributed.get_backend() == "nccl" else torch.device("cpu")


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


# ------------------------------------------------------------------------------------ reductions
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


def unshard(shards: Sequence[Sequence[T]], total: int) -> list[T]:
    """Puts strided shares (:func:`shard`, in rank order) back into the original order of ``total`` items.

    Raises:
        ValueError: if the shares do not hold exactly ``total`` items.
    """
    if sum(len(part) for part in shards) != total:
        raise ValueError(f"the shares hold {sum(len(part) for part in shards)} items, expected {total}")
    world_size = len(shards)
    return [shards[index % world_size][index // world_size] for index in range(total)]


def barrier(context: DistributedContext) -> None:
    """Waits for every rank."""
    if context.enabled:
        torch_distributed.barrier()


def run_training_stage(
    module: str,
    section: str,
    processes_per_node: int,
    backend: str,
    device: str,
    batch_size: int,
    stage_arguments: Sequence[str],
    train: Callable[[DistributedContext], None],
) -> None:
    """What both training stages do around their training: launch, join the group, train, leave.

    With ``processes_per_node > 1`` outside ``torchrun`` the stage module is re-launched under the elastic
    launcher; otherwise this process joins the group (or runs alone) and calls ``train``.

    Args:
        module: the stage module to re-launch (``stages.train_classifier``).
        section: its params section, for messages (``classifier``).
        processes_per_node: ``<section>.distributed.processes_per_node``.
        backend: ``<section>.distributed.backend``.
        device: ``<section>.device``.
        batch_size: ``<section>.batch_size``, the global batch the processes must divide.
        stage_arguments: the command-line arguments a re-launch passes on.
        train: the training itself, given this process's context.
    """
    if processes_per_node > 1 and not launched_by_torchrun():
        relaunch_or_fail(module, processes_per_node, stage_arguments, batch_size=(f"{section}.batch_size", batch_size))
        return
    try:
        context = init_distributed(backend, device)
    except RuntimeError as error:
        raise DeviceError(f"{section}.device: {error}") from None
    if not context.is_main:
        # One process reports progress; the others would repeat every line.
        logging.getLogger().setLevel(logging.WARNING)
    with leaving_process_group(context):
        train(context)


class DeviceError(UserInputError):
    """Raised when the requested device is not available."""
