"""What every section of the ``params.yaml`` schema shares: strict models and the error they raise."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from weakseg.errors import UserInputError


class ParamsError(UserInputError):
    """Raised when ``params.yaml`` does not match the schema."""


class _Strict(BaseModel):
    """Base model: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _key_error(model: str, key: tuple[str, ...], value: Any, message: str) -> ValidationError:
    """A validation error located at ``key`` (relative to the model), for checks that span several keys.

    Raised from a model validator, pydantic prefixes the location with the model's own place in
    ``params.yaml``, so the message names the full dotted key (``classifier.unfreeze.full_epoch``).
    """
    detail = InitErrorDetails(
        type=PydanticCustomError("value_order", "{message}", {"message": message}), loc=key, input=value
    )
    return ValidationError.from_exception_data(model, [detail])
