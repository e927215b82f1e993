"""PyTorch distributed runs of the stages: launching, process groups, sharding, collectives, models.

Training stages re-launch themselves in several processes (:mod:`~weakseg.distributed.launch`); the
inference stages (generate_cams, evaluate) shard their tiles over the processes when ``torchrun`` starts
them. Each process finds its place in the group (:mod:`~weakseg.distributed.process_group`), takes its
strided share of the work (:mod:`~weakseg.distributed.sampling`) and exchanges results with the others
(:mod:`~weakseg.distributed.collectives`).

Only rank 0 writes checkpoints, metrics and MLflow records; every rank computes the same global numbers
because validation counts and predictions are reduced across ranks, so every rank also takes the same
best-epoch and early-stopping decisions (a rank that decided differently would wait forever in the next
collective call).

Batch norm: every process normalises with the statistics of the global batch, as one process would
(:mod:`~weakseg.distributed.wrapping`). So a distributed run differs from a one-process run with the same
global batch only by float summation order and the per-process augmentation and dropout streams. The
training losses are computed on the global batch too (:func:`gather_batch`), so set-level terms (Focal
Tversky, Dice, Lovasz) see what one process would.
"""

from weakseg.distributed.collectives import (
    all_reduce_sum,
    average_buffers,
    barrier,
    differentiable_all_reduce_sum,
    gather_batch,
    gather_objects,
)
from weakseg.distributed.launch import (
    DeviceError,
    DistributedLaunchError,
    StageRelaunch,
    relaunch,
    relaunch_command,
    relaunch_or_fail,
    run_distributed_stage,
    run_training_stage,
)
from weakseg.distributed.process_group import (
    DistributedContext,
    init_distributed,
    launched_by_torchrun,
    leaving_process_group,
    resolve_backend,
    select_device,
    shutdown,
)
from weakseg.distributed.sampling import (
    DistributedBatchError,
    SameOrderDistributedSampler,
    pad_to_multiple,
    per_process_batch_size,
    shard,
    single_process_order,
    unshard,
)
from weakseg.distributed.wrapping import (
    GlooSyncBatchNorm,
    convert_to_gloo_sync_batch_norm,
    prepare_model,
    wrap_model,
)

__all__ = [
    "DeviceError",
    "DistributedBatchError",
    "DistributedContext",
    "DistributedLaunchError",
    "GlooSyncBatchNorm",
    "SameOrderDistributedSampler",
    "StageRelaunch",
    "all_reduce_sum",
    "average_buffers",
    "barrier",
    "convert_to_gloo_sync_batch_norm",
    "differentiable_all_reduce_sum",
    "gather_batch",
    "gather_objects",
    "init_distributed",
    "launched_by_torchrun",
    "leaving_process_group",
    "pad_to_multiple",
    "per_process_batch_size",
    "prepare_model",
    "relaunch",
    "relaunch_command",
    "relaunch_or_fail",
    "resolve_backend",
    "run_distributed_stage",
    "run_training_stage",
    "select_device",
    "shard",
    "shutdown",
    "single_process_order",
    "unshard",
    "wrap_model",
]
