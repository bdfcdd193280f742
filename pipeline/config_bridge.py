"""Typed Dagster run config from ldm_core's pydantic configs, without writing every field twice.

`dagster_config(Model)` builds a ``dagster.Config`` class with the same fields, types and docstrings as an
ldm_core ``StrictModel`` (nested models become nested Config classes), so the Dagster UI's launchpad shows the
real schema and Dagster rejects a wrong type or an unknown key before the run starts. Every field is optional on
the Dagster side and unset means "ldm_core's default": Dagster fills unset fields with their defaults, and if
those were ldm_core's values, a preset (``model: {preset: tiny}``) or a derived default (the sampler that matches
the objective) could not tell a user's choice from a filler. `to_core` drops the unset fields and validates the
rest with the ldm_core model, which applies presets, defaults and the cross-field checks.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import dagster as dg
from pydantic import BaseModel, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

_CACHE: dict[tuple[type, tuple[str, ...]], type[dg.Config]] = {}


def _convert_type(tp: Any) -> Any:
    """The Dagster-config type for a pydantic annotation (before making it optional)."""
    origin = get_origin(tp)
    if origin is typing.Annotated:
        return _convert_type(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        args = [_unannotated(a) for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _convert_type(args[0])
        if all(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
            # a tagged union of configs (the denoiser backbones): one section with every member's fields, whose
            # `kind` picks the member; ldm_core validates the chosen member's fields (`to_core`)
            return _union_config(tuple(args))
        if set(args) <= {int, float}:
            return float
        return str
    if origin is tuple:
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return list[_convert_type(args[0])] if args else list
    if origin is list:
        (inner,) = get_args(tp) or (str,)
        return list[_convert_type(inner)]
    if origin is dict:
        return dict[str, Any]
    if origin is Literal:
        return str  # Dagster has no optional enums; the choices are in the description and checked by ldm_core
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return dagster_config(tp)
    return tp


def _default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "see fields"
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def _choices(tp: Any) -> list[Any]:
    for a in (tp, *get_args(tp)):
        if get_origin(a) is Literal:
            return list(get_args(a))
    return []


def _unannotated(tp: Any) -> Any:
    return get_args(tp)[0] if get_origin(tp) is typing.Annotated else tp


def _field_specs(model: type[BaseModel], exclude: tuple[str, ...]) -> dict[str, Any]:
    """name -> (optional Dagster type, FieldInfo with the description and ldm_core's default) of each field."""
    fields: dict[str, Any] = {}
    if "_expand_preset" in dir(model):
        preset = FieldInfo(default=None, description="Start from this named preset; other fields override it.")
        fields["preset"] = (str | None, preset)
    for name, field in model.model_fields.items():
        if field.exclude or name in exclude:
            continue  # secrets are never part of run config; excluded fields are set by the asset
        tp = _convert_type(field.annotation)
        desc = (field.description or "").strip()
        choices = _choices(field.annotation)
        if choices:
            desc += f" One of {choices}."
        desc += f" (default: {_default_text(field)})"
        fields[name] = (tp | None, FieldInfo(default=None, description=desc.strip()))
    return fields


def _union_config(models: tuple[type[BaseModel], ...]) -> type[dg.Config]:
    """One Dagster section for a tagged union of configs: the fields of every member, each described with the kinds
    that have it; ``kind`` (unset: the first member) says which member the section is."""
    if (models, ()) in _CACHE:
        return _CACHE[(models, ())]
    kinds = {m: m.model_fields["kind"].default for m in models}
    fields: dict[str, Any] = {}
    owners: dict[str, list[str]] = {}
    for model in models:
        for name, (tp, info) in _field_specs(model, ()).items():
            owners.setdefault(name, []).append(kinds[model])
            fields.setdefault(name, (tp, info))
    for name, (_tp, info) in fields.items():
        if name == "kind":
            info.description = f"Which one: one of {list(kinds.values())} (default: {kinds[models[0]]!r})."
        elif len(owners[name]) < len(models):
            info.description = f"[{', '.join(owners[name])} only] {info.description}"
    cls = create_model(
        "Or".join(m.__name__ for m in models) + "Dagster",
        __base__=dg.Config,
        __doc__=" | ".join(kinds.values()),
        **fields,
    )
    _CACHE[(models, ())] = cls
    return cls


def dagster_config(model: type[BaseModel], exclude: tuple[str, ...] = ()) -> type[dg.Config]:
    """A ``dagster.Config`` subclass mirroring ``model`` (cached per model class); ``exclude`` drops fields the
    asset sets itself."""
    if (model, exclude) in _CACHE:
        return _CACHE[(model, exclude)]
    fields = _field_specs(model, exclude)
    cls = create_model(f"{model.__name__}Dagster", __base__=dg.Config, __doc__=model.__doc__, **fields)
    _CACHE[(model, exclude)] = cls
    return cls


def _drop_unset(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_unset(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_unset(v) for v in value]
    return value


class ConfigValidationError(dg.Failure, ValueError):
    """A run config section that ldm_core rejects; the message names each field path. Raised in a step, it fails the
    step for good: a retry would meet the same config (a RetryPolicy passes over Failures that disallow retries)."""

    def __init__(self, message: str):
        super().__init__(description=message, allow_retries=False)


def _union_members(tp: Any) -> dict[str, type[BaseModel]]:
    """kind -> member of a tagged union of configs (empty for anything else)."""
    tp = _unannotated(tp)
    if get_origin(tp) not in (Union, types.UnionType):
        return {}
    members = [_unannotated(a) for a in get_args(tp)]
    return {
        m.model_fields["kind"].default: m
        for m in members
        if isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields
    }


def _field_path(model: type[BaseModel], loc: tuple[Any, ...]) -> list[Any]:
    """An error location as the run config's field path: without the member tag pydantic inserts after a tagged
    union's field (``denoiser.mmdit.patch_size`` is the user's ``denoiser.patch_size``)."""
    path: list[Any] = []
    current: Any = model
    for part in loc:
        members = _union_members(current)
        if part in members:
            current = members[part]
            continue
        path.append(part)
        fields = current.model_fields if isinstance(current, type) and issubclass(current, BaseModel) else {}
        current = fields[part].annotation if isinstance(part, str) and part in fields else None
    return path


def to_core(model: type[BaseModel], value: dg.Config | dict[str, Any] | None, section: str = "") -> Any:
    """Validate Dagster config values with the ldm_core model (presets, defaults, cross-field checks)."""
    data = value.model_dump() if isinstance(value, BaseModel) else dict(value or {})
    try:
        return model.model_validate(_drop_unset(data))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            path = ".".join(str(p) for p in (section, *_field_path(model, err["loc"])) if p != "")
            lines.append(f"{path}: {err['msg']}")
        raise ConfigValidationError("invalid run config:\n  " + "\n  ".join(lines)) from e
