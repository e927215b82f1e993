"""Progressive unfreezing of the classifier's pretrained ResNet: which parameter groups train in which epoch.

Epochs are counted from 0. With ``classifier.unfreeze`` enabled the head trains alone first, then the
pretrained layers join from the top down (``layer4``, ``layer3``, ``layer2``), and from ``full_epoch`` on
``layer1`` and the stem join and the whole network trains. A frozen group keeps its batch-norm running
statistics too (:func:`set_training_mode`).
"""

from __future__ import annotations

from torch import nn

from weakseg.params import UnfreezeParams

#: Parameter groups of a torchvision ResNet. ``stem`` is ``conv1`` + ``bn1``; ``fc`` is the new head.
STEM_GROUP = "stem"
HEAD_GROUP = "fc"
ALL_GROUPS: frozenset[str] = frozenset({STEM_GROUP, "layer1", "layer2", "layer3", "layer4", HEAD_GROUP})
#: Pretrained groups in the order they are unfrozen; the last step (layer1 + stem) happens at ``full_epoch``.
UNFREEZE_ORDER: tuple[frozenset[str], ...] = (
    frozenset({"layer4"}),
    frozenset({"layer3"}),
    frozenset({"layer2"}),
    frozenset({"layer1", STEM_GROUP}),
)


def trainable_groups(epoch: int, unfreeze: UnfreezeParams) -> set[str]:
    """The parameter groups that train in ``epoch`` (counted from 0).

    With unfreezing enabled, epochs ``0 .. frozen_epochs - 1`` train only the head; the span from
    ``frozen_epochs`` to ``full_epoch`` is cut into three equal phases that add ``layer4``, then
    ``layer3``, then ``layer2``; from ``full_epoch`` on, ``layer1`` and the stem join and the whole
    network trains. Disabled, every group trains in every epoch.

    Args:
        epoch: the epoch, from 0.
        unfreeze: the schedule.

    Returns:
        A subset of :data:`ALL_GROUPS`, always containing the head.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if not unfreeze.enabled or epoch >= unfreeze.full_epoch:
        return set(ALL_GROUPS)
    if epoch < unfreeze.frozen_epochs:
        return {HEAD_GROUP}
    span = unfreeze.full_epoch - unfreeze.frozen_epochs  # > 0 here: frozen_epochs <= epoch < full_epoch
    steps = 1 + (len(UNFREEZE_ORDER) - 1) * (epoch - unfreeze.frozen_epochs) // span
    groups = {HEAD_GROUP}
    for step in UNFREEZE_ORDER[:steps]:
        groups |= step
    return groups


def parameter_group(name: str) -> str:
    """The group of a ResNet parameter or module name (``layer3.1.conv2.weight`` -> ``layer3``)."""
    head = name.split(".", 1)[0]
    if head in ("conv1", "bn1"):
        return STEM_GROUP
    if head in ALL_GROUPS:
        return head
    raise ValueError(f"parameter {name!r} belongs to no ResNet group {sorted(ALL_GROUPS)}")


def apply_trainable_groups(model: nn.Module, groups: set[str]) -> None:
    """Sets ``requires_grad`` of every parameter: True exactly for the parameters of ``groups``."""
    unknown = set(groups) - ALL_GROUPS
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}, expected a subset of {sorted(ALL_GROUPS)}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(parameter_group(name) in groups)


def set_training_mode(model: nn.Module, groups: set[str]) -> None:
    """Training mode, except the batch-norm layers of frozen groups.

    A frozen pretrained layer keeps its running statistics too: updating them on a few batches of a new
    domain would change what the frozen weights compute.
    """
    model.train()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and parameter_group(name) not in groups:
            module.eval()
