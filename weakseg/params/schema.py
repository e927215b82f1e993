"""The whole of ``params.yaml`` as one model, and the functions that read and validate it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from weakseg.params.base import ParamsError, _key_error, _Strict
from weakseg.params.data import DataParams, NormalizeParams, SplitParams
from weakseg.params.evaluation import EvaluateParams
from weakseg.params.pseudo_masks import CROP_EVIDENCE_NEEDS_A_SIZE, CamParams, RefineParams
from weakseg.params.training import ClassifierParams, SegmenterParams


class Params(_Strict):
    """The whole of ``params.yaml``."""

    seed: int = Field(42, ge=0)
    data: DataParams = DataParams()
    split: SplitParams = SplitParams()
    normalize: NormalizeParams = NormalizeParams()
    classifier: ClassifierParams = ClassifierParams()
    cam: CamParams = CamParams()
    refine: RefineParams = RefineParams()
    segmenter: SegmenterParams = SegmenterParams()
    evaluate: EvaluateParams = EvaluateParams()

    @model_validator(mode="after")
    def _crop_evidence_has_a_size(self) -> Params:
        if (
            self.cam.method == "crop_evidence"
            and self.cam.evidence_crop_size is None
            and self.classifier.crop_size is None
        ):
            raise _key_error("Params", ("cam", "evidence_crop_size"), None, CROP_EVIDENCE_NEEDS_A_SIZE)
        return self


def _format_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling against params.yaml's documented keys)"
        got = item.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {message}{got_text}")
    return "\n".join(lines)


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validates a mapping against the schema.

    Args:
        raw: the parsed YAML document.
        source: a name for messages (the file path).

    Returns:
        The validated parameters.

    Raises:
        ParamsError: naming each bad key and what was expected.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(_format_error(error, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Reads and validates a params file.

    Raises:
        ParamsError: if the file is missing, is not YAML, or does not match the schema.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw, str(path))
