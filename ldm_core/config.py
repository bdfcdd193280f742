"""The base of every typed config in ldm_core.

Every stage is configured by one pydantic model with ``extra="forbid"``: a misspelled key is an error at the
boundary, with the field path in the message, before any work starts.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T", bound="StrictModel")


class StrictModel(BaseModel):
    """A config object: unknown keys are rejected, assignments are validated, values are plain data."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (what goes into checkpoints, MLflow params and run configs)."""
        return self.model_dump(mode="json")


def flatten_dict(d: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values. Used to log a nested config as flat params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten_dict(v, key, sep))
        else:
            out[key] = v
    return out
