"""How the processes of a distributed run split the work: batch sizes, strided shares and the sampler.

Shares are strided (every ``world_size``-th item from ``rank``), so the ranks' step-``s`` batches
together are the one-process run's batch ``s``, and :func:`unshard` puts gathered shares back in order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
from torch.utils.data.distributed import DistributedSampler

from weakseg.distributed.process_group import DistributedContext
from weakseg.errors import UserInputError

T = TypeVar("T")


class DistributedBatchError(UserInputError):
    """Raised when a batch size cannot be split evenly over the processes."""


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


def unshard(shards: Sequence[Sequence[T]], total: int) -> list[T]:
    """Puts strided shares (:func:`shard`, in rank order) back into the original order of ``total`` items.

    Raises:
        ValueError: if the shares do not hold exactly ``total`` items.
    """
    if sum(len(part) for part in shards) != total:
        raise ValueError(f"the shares hold {sum(len(part) for part in shards)} items, expected {total}")
    world_size = len(shards)
    return [shards[index % world_size][index // world_size] for index in range(total)]


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
