"""Validate a whole run config before any work starts: Dagster's schema (types, unknown keys) and ldm_core's
models (presets, cross-field checks), plus the bounds of the asset configs and combinations across assets; every
error names its field path.

- `validate_run_config(run_config, job)`: everything, for `ldm demo` / `ldm validate` before a launch;
- `check_sections(run_config)`: what Dagster's typed schema cannot see. Each asset folder's ``validation.py`` checks
  its own section, and its combinations with what the assets upstream of it resolved, in the assets' dependency
  order; this module checks the resources;
- `RunConfigCheck`: the resource every asset takes (`tests/pipeline/test_definitions.py` holds every asset to it),
  which runs `check_sections` when a run's resources are initialized, i.e. before the first asset of a run launched
  any other way (UI, `dagster job execute`, schedule, sensor) does any work. A deployment swaps or drops it like any
  other resource.
"""

from __future__ import annotations

import graphlib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from types import ModuleType
from typing import Any, get_args

import dagster as dg
import torch

from ldm_core.trainers.config import Precision
from pipeline.config_bridge import ConfigValidationError, to_core

PRECISIONS = get_args(Precision)


class RunConfigCheck(dg.ConfigurableResource):
    """Refuses a run whose config ldm_core would refuse (presets, bounds, combinations across assets), when the run's
    resources are initialized: before its first asset does any work. Dagster's typed config has already refused
    wrong types and unknown keys by then."""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        run = context.dagster_run
        if run is not None and run.run_config:
            check_sections(run.run_config)


@dataclass
class RunConfigValidation:
    """One run config being validated: the errors found so far, and what the sections checked so far resolved to
    (``resolved``: e.g. the autoencoder's config, which the sections downstream check their shapes against)."""

    run_config: dict[str, Any]
    errors: list[str] = field(default_factory=list)
    resolved: dict[str, Any] = field(default_factory=dict)

    def present(self, asset: str) -> bool:
        """The run config has a section for ``asset`` (a job of a subset of the assets has only theirs)."""
        return asset in (self.run_config.get("ops") or {})

    def section(self, asset: str) -> dict[str, Any]:
        return ((self.run_config.get("ops") or {}).get(asset) or {}).get("config") or {}

    def core(self, model: type, data: Any, path: str) -> Any:
        """``to_core(model, data, path)``, its errors collected instead of raised; None when it is refused."""
        try:
            return to_core(model, data, path)
        except ConfigValidationError as e:
            self.errors.extend(line.strip() for line in str(e).splitlines()[1:])
            return None

    def check_device(self, spec: str, path: str) -> None:
        """The device must be one torch can name ("auto", "cpu", "cuda", "cuda:1", …); whether it exists is the
        machine's business, not the config's (a run is often configured on a laptop and run on a GPU node)."""
        if spec == "auto":
            return
        try:
            torch.device(spec)
        except (RuntimeError, ValueError) as e:
            self.errors.append(f"{path}: {spec!r} is not a torch device ({str(e).splitlines()[0]})")


@dataclass(frozen=True)
class SectionValidator:
    asset: str
    config: type[dg.Config]
    """The asset's config class: its own fields' bounds."""
    validate: Callable[[RunConfigValidation], None]
    """Its ldm_core sections and its combinations with the assets upstream."""


def _asset_def(module: ModuleType) -> dg.AssetsDefinition:
    return next(v for v in vars(module).values() if isinstance(v, dg.AssetsDefinition))


@cache
def section_validators() -> tuple[SectionValidator, ...]:
    """The ``validation.py`` of every asset folder in ``pipeline.defs``, upstream assets first."""
    import pipeline.defs

    found: dict[str, SectionValidator] = {}
    graph: dict[str, set[str]] = {}
    for info in pkgutil.iter_modules(pipeline.defs.__path__):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"pipeline.defs.{info.name}.validation")
        asset = _asset_def(importlib.import_module(f"pipeline.defs.{info.name}.asset"))
        found[info.name] = SectionValidator(info.name, module.CONFIG, module.validate)
        graph[info.name] = {key.to_user_string() for key in asset.dependency_keys}
    order = graphlib.TopologicalSorter(graph).static_order()
    return tuple(found[name] for name in order if name in found)


def validate_run_config(run_config: dict[str, Any], job: dg.JobDefinition) -> None:
    """Validate ``run_config`` for ``job`` (Dagster's schema, then `check_sections`)."""
    try:
        dg.validate_run_config(job, run_config)
    except dg.DagsterInvalidConfigError as e:
        raise ConfigValidationError("invalid run config:\n  " + "\n  ".join(err.message for err in e.errors)) from e
    check_sections(run_config)


def check_sections(run_config: dict[str, Any]) -> None:
    """Validate every asset section present in ``run_config`` with ldm_core's models, bounds and cross-asset
    combinations; raise `ConfigValidationError` listing every problem with its field path."""
    v = RunConfigValidation(run_config)
    validators = section_validators()
    for section in validators:  # the asset configs' own fields (their bounds are declared on the fields)
        if v.present(section.asset):
            v.core(section.config, v.section(section.asset), section.asset)
    for section in validators:
        section.validate(v)
    _check_resources(v)
    if v.errors:
        raise ConfigValidationError("invalid run config:\n  " + "\n  ".join(v.errors))


def _check_resources(v: RunConfigValidation) -> None:
    compute = ((v.run_config.get("resources") or {}).get("compute") or {}).get("config") or {}
    if compute.get("device") is not None:
        v.check_device(compute["device"], "resources.compute.device")
    if compute.get("precision") is not None and compute["precision"] not in PRECISIONS:
        v.errors.append(f"resources.compute.precision: {compute['precision']!r} is not one of {list(PRECISIONS)}")
    for name in ("num_processes", "threads"):  # num_processes may also be "auto"
        value = compute.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
            v.errors.append(f"resources.compute.{name}: {value} must be >= 1")
