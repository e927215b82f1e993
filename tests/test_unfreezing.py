"""Progressive unfreezing: which ResNet parameter groups train in which epoch."""

from __future__ import annotations

import pytest
import torch

from weakseg import models
from weakseg.params import UnfreezeParams
from weakseg.training import unfreezing

SCHEDULE = UnfreezeParams(frozen_epochs=5, full_epoch=25, enabled=True)
EVERYTHING = {"stem", "layer1", "layer2", "layer3", "layer4", "fc"}


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0, {"fc"}),
        (4, {"fc"}),
        (5, {"fc", "layer4"}),
        (11, {"fc", "layer4"}),
        (12, {"fc", "layer4", "layer3"}),
        (18, {"fc", "layer4", "layer3"}),
        (19, {"fc", "layer4", "layer3", "layer2"}),
        (24, {"fc", "layer4", "layer3", "layer2"}),
        (25, EVERYTHING),
        (40, EVERYTHING),
    ],
)
def test_trainable_groups_follow_the_schedule(epoch: int, expected: set[str]) -> None:
    assert unfreezing.trainable_groups(epoch, SCHEDULE) == expected


def test_disabled_schedule_and_immediate_full_epoch_train_everything() -> None:
    assert unfreezing.trainable_groups(0, UnfreezeParams(enabled=False)) == EVERYTHING
    assert unfreezing.trainable_groups(3, UnfreezeParams(frozen_epochs=3, full_epoch=3, enabled=True)) == EVERYTHING
    assert unfreezing.trainable_groups(2, UnfreezeParams(frozen_epochs=3, full_epoch=3, enabled=True)) == {"fc"}


def test_requires_grad_follows_the_groups_of_each_epoch() -> None:
    model = models.build_classifier("resnet18", "none")
    for epoch, expected in [
        (0, {"fc"}),
        (5, {"fc", "layer4"}),
        (19, EVERYTHING - {"stem", "layer1"}),
        (25, EVERYTHING),
    ]:
        unfreezing.apply_trainable_groups(model, unfreezing.trainable_groups(epoch, SCHEDULE))
        trainable = {unfreezing.parameter_group(name) for name, p in model.named_parameters() if p.requires_grad}
        frozen = {unfreezing.parameter_group(name) for name, p in model.named_parameters() if not p.requires_grad}
        assert trainable == expected, epoch
        assert frozen == EVERYTHING - expected, epoch
    stem_conv, stem_norm = model.conv1, model.bn1
    assert isinstance(stem_conv, torch.nn.Conv2d) and isinstance(stem_norm, torch.nn.BatchNorm2d)
    assert stem_conv.weight.requires_grad and stem_norm.weight.requires_grad
