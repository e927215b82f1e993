"""Classifier and segmenter builders, pretrained-weight loading, and checkpoint I/O.

A registry maps architecture names to builders, as in segmentation_models.pytorch. Checkpoints are plain
dictionaries of tensors and primitives, so :func:`load_checkpoint` can use ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from weakseg.errors import UserInputError
from weakseg.io import atomic_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101")


class WeightsError(UserInputError):
    """Raised when requested pretrained weights cannot be had."""


class CheckpointError(UserInputError):
    """Raised when a checkpoint file is missing, unreadable or of the wrong kind."""


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    import torchvision.models as tv_models

    if name not in RESNET_NAMES:
        raise ValueError(f"unknown architecture {name!r}, expected one of {RESNET_NAMES}")
    return getattr(tv_models, name)


def _imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's published ImageNet weights; cached after the first download."""
    import torchvision.models as tv_models

    enum_name = {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50", "resnet101": "ResNet101"}[name]
    weights = getattr(tv_models, f"{enum_name}_Weights").IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # urllib, SSL, socket: all mean the same thing to a user
        raise WeightsError(
            f"cannot obtain ImageNet weights for {name} ({type(error).__name__}: {error}). "
            f"This machine may be offline: set weights to 'none', or to the path of a local weights file "
            f"(a state dict saved with torch.save)."
        ) from None


def _local_state_dict(path: str) -> dict[str, torch.Tensor]:
    file = Path(path)
    if not file.is_file():
        raise WeightsError(f"weights file {file} not found; expected 'imagenet', 'none' or a path to a state dict")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"{file}: cannot load weights ({error})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{file}: expected a state dict, got {type(state).__name__}")
    return state


def resolve_backbone_weights(weights: str, arch: str) -> dict[str, torch.Tensor] | None:
    """The backbone state dict for ``weights`` ('imagenet', 'none' or a file path); None for 'none'."""
    if weights == "none":
        return None
    if weights == "imagenet":
        return _imagenet_state_dict(arch)
    return _local_state_dict(weights)


def build_classifier(arch: str, weights: str = "none") -> nn.Module:
    """A torchvision ResNet with a one-logit head for the positive class.

    Args:
        arch: one of ``RESNET_NAMES``.
        weights: 'imagenet', 'none', or a path to a state dict (its ``fc`` entries are ignored).
    """
    model = _torchvision_builder(arch)(weights=None)
    state = resolve_backbone_weights(weights, arch)
    if state is not None:
        backbone = {key: value for key, value in state.items() if not key.startswith("fc.")}
        missing, unexpected = model.load_state_dict(backbone, strict=False)
        missing = [key for key in missing if not key.startswith("fc.")]
        if missing or unexpected:
            raise WeightsError(
                f"weights {weights!r} do not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    model.fc = nn.Linear(cast(nn.Linear, model.fc).in_features, 1)
    return model


class Segmenter(nn.Module):
    """smp's DeepLabV3+ with its auxiliary classification head; returns ``(mask_logits, label_logits)``."""

    def __init__(self, encoder: str, weights: str = "none", classification_dropout: float = 0.2) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        if encoder not in RESNET_NAMES:
            raise ValueError(f"unknown encoder {encoder!r}, expected one of {RESNET_NAMES}")
        self.network = smp.DeepLabV3Plus(
            encoder_name=encoder,
            encoder_weights=None,
            classes=1,
            aux_params={"classes": 1, "pooling": "avg", "dropout": classification_dropout},
        )
        state = resolve_backbone_weights(weights, encoder)
        if state is not None:
            backbone = {key: value for key, value in state.items() if not key.startswith("fc.")}
            # smp's encoder overrides load_state_dict without returning the key report; ask nn.Module's.
            missing, unexpected = nn.Module.load_state_dict(self.network.encoder, backbone, strict=False)
            if missing or unexpected:
                raise WeightsError(
                    f"weights {weights!r} do not fit encoder {encoder}: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits ``(N, 1, H, W)`` and tile logits ``(N, 1)``."""
        masks, labels = self.network(images)
        return masks, labels


def build_segmenter(encoder: str, weights: str = "none") -> Segmenter:
    """DeepLabV3+ with a ResNet encoder, one output map and a tile-level head."""
    return Segmenter(encoder, weights)


MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "classifier": build_classifier,
    "segmenter": build_segmenter,
}


def save_checkpoint(path: str | Path, kind: str, arch: str, model: nn.Module, **extra: Any) -> None:
    """Writes ``{"kind", "arch", "state_dict", **extra}`` atomically.

    ``extra`` holds what inference needs (preprocessing, labels, tile size, epoch, metrics) and must be
    tensors, numbers, strings, lists or dicts of those, so that ``weights_only`` loading accepts it.
    """
    if kind not in MODEL_BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}, expected one of {sorted(MODEL_BUILDERS)}")
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    payload = {"kind": kind, "arch": arch, "state_dict": state, **extra}
    # Serialised in memory first: torch.save names the zip's records after the file it writes, and the
    # atomic temporary's random name would otherwise make equal checkpoints differ in their bytes.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as temporary:
        temporary.write_bytes(buffer.getvalue())


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Reads a checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: naming the file, if it is missing, unreadable, or not of ``kind``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (run the stage that writes it first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: cannot read checkpoint ({error})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "arch" not in payload:
        raise CheckpointError(f"{path}: not a weakseg checkpoint")
    if kind is not None and payload.get("kind") != kind:
        raise CheckpointError(f"{path}: a {payload.get('kind')!r} checkpoint, expected {kind!r}")
    return payload


def model_from_checkpoint(payload: dict[str, Any]) -> nn.Module:
    """Rebuilds the model a checkpoint describes (no pretrained download) and loads its weights."""
    model = MODEL_BUILDERS[payload["kind"]](payload["arch"], "none")
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model
