"""Run configs in pipeline/configs/*.yaml: loading, choosing the one schedules and sensors use, validating.

Which config a schedule or sensor launches with: LDM_RUN_CONFIG (a path) if set, else pipeline/configs/demo.yaml.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"


def available() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def load(path_or_name: str | Path | None = None) -> dict[str, Any]:
    """A run config by path, by preset name (``demo``), or the default (LDM_RUN_CONFIG, else demo)."""
    if path_or_name is None:
        path_or_name = os.environ.get("LDM_RUN_CONFIG") or DEFAULT_CONFIG
    p = Path(path_or_name)
    if not p.exists() and str(path_or_name) in available():
        p = available()[str(path_or_name)]
    if not p.exists():
        raise FileNotFoundError(f"run config {path_or_name!r} not found (presets: {sorted(available())})")
    with open(p, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def for_assets(run_config: dict[str, Any], asset_names: set[str]) -> dict[str, Any]:
    """The part of a run config that a job selecting only ``asset_names`` accepts (ops config is per asset)."""
    out = copy.deepcopy(run_config)
    ops = out.get("ops") or {}
    out["ops"] = {k: v for k, v in ops.items() if k in asset_names}
    return out


def with_warm_start(run_config: dict[str, Any]) -> dict[str, Any]:
    """The run config with ``ldm_model.init_from: auto`` (the champion when it is a valid warm start, else from
    scratch) unless it sets init_from itself: what retraining runs ask for. ``init_from: none`` in the run config
    keeps them from scratch."""
    out = copy.deepcopy(run_config)
    ops = out.get("ops") or {}
    if "ldm_model" in ops:
        section = ops["ldm_model"] = dict(ops["ldm_model"] or {})
        config = section["config"] = dict(section.get("config") or {})
        config.setdefault("init_from", "auto")
    return out


def dataset_source(run_config: dict[str, Any]) -> str | None:
    return (((run_config.get("ops") or {}).get("image_dataset") or {}).get("config") or {}).get("source")
