"""Helpers of the end-to-end tests: running the pipeline's jobs (in this process or through `dagster job execute`) and
reading what a run left in Dagster and MLflow. Fixtures are in conftest.py."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from mlflow.tracking import MlflowClient

from pipeline.definitions import defs
from tests.common import ROOT, metadata_values

DAGSTER = Path(sys.executable).parent / "dagster"
PRETRAINED_EXAMPLES = ROOT / "pipeline" / "configs" / "pretrained"
"""The example configs that start from pretrained weights (each with a placeholder source to replace)."""
ASSETS = tuple(k.to_user_string() for k in defs.resolve_asset_graph().toposorted_asset_keys)
"""The assets of ldm_training_job, upstream first (from the definitions, not a hand-kept list)."""
EXPERIMENT = "ldm-pipeline"


def upto(asset: str) -> tuple[str, ...]:
    """The assets of ldm_training_job from the first through ``asset``."""
    return ASSETS[: ASSETS.index(asset) + 1]


def merged(base: dict, over: dict) -> dict:
    """``base`` with ``over`` merged in through nested dicts (``over``'s values win); neither is changed."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def child_env(home: Path) -> dict[str, str]:
    """The environment of a child process (the `dagster` or `ldm` CLI, a fresh interpreter) on the LDM_HOME ``home``."""
    env = dict(os.environ)
    # mlflow.set_registry_uri (called in this process by MLflowResource) exports MLFLOW_REGISTRY_URI: a child with
    # its own tracking store must not inherit the registry of this one
    env.pop("MLFLOW_REGISTRY_URI", None)
    env.update(
        {
            "LDM_HOME": str(home),
            "DAGSTER_HOME": str(home / "dagster"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
            "HF_HUB_OFFLINE": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
    )
    return env


# ---------------------------------------------------------------------------------------------------------------
# Running a job
# ---------------------------------------------------------------------------------------------------------------


def execute(
    run_config: dict,
    assets: Iterable[str] | None = None,
    *,
    job: str = "ldm_training_job",
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    """``job`` in this process on the instance at DAGSTER_HOME: the whole job, or only ``assets`` with only their ops
    config. ``raise_on_error=False`` returns a failed run's result instead of raising its error."""
    from pipeline import run_configs

    job_def = defs.resolve_job_def(job)
    if assets is not None:
        assets = set(assets)
        job_def = job_def.get_subset(asset_selection={dg.AssetKey(a) for a in assets})
        run_config = run_configs.for_assets(run_config, assets)
    with dg.DagsterInstance.get() as instance:
        return job_def.execute_in_process(run_config=run_config, instance=instance, raise_on_error=raise_on_error)


def dagster_job_execute(
    home: Path,
    config: dict | Path,
    assets: Sequence[str] | None = None,
    *,
    job: str = "ldm_training_job",
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`dagster job execute` of ``job`` in a child process on the LDM_HOME ``home``: a config file, or a run config
    (written to ``home``/run.yaml); with ``assets``, only those ops, with only their ops config."""
    if isinstance(config, dict):
        from pipeline import run_configs

        path = home / "run.yaml"
        path.write_text(yaml.safe_dump(run_configs.for_assets(config, set(assets)) if assets else config))
        config = path
    cmd = [str(DAGSTER), "job", "execute", "-m", "pipeline.definitions", "-j", job, "-c", str(config)]
    if assets:
        cmd += ["--op-selection", ",".join(assets)]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(home), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# What a run left in Dagster
# ---------------------------------------------------------------------------------------------------------------


def materialized_metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    """The metadata of the run's (first) materialization of ``asset``, as plain values."""
    return metadata_values(result.asset_materializations_for_node(asset)[0].metadata)


def latest_metadata(asset: str, instance: dg.DagsterInstance | None = None) -> dict[str, Any]:
    """The metadata of the latest materialization of ``asset`` on ``instance`` (else the one at DAGSTER_HOME)."""
    if instance is None:
        with dg.DagsterInstance.get() as instance:
            return latest_metadata(asset, instance)
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    return metadata_values(event.asset_materialization.metadata)


def materialized_assets(result: dg.ExecuteInProcessResult) -> set[str]:
    """The assets the run materialized."""
    return {
        e.event_specific_data.materialization.asset_key.to_user_string()
        for e in result.get_asset_materialization_events()
    }


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    """{check name: passed} of the asset checks the run evaluated."""
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def step_events(result: dg.ExecuteInProcessResult, step: str) -> list[str]:
    """The event types of one step, in order (STEP_START, STEP_UP_FOR_RETRY, ...)."""
    return [e.event_type_value for e in result.all_events if e.step_key == step]


# ---------------------------------------------------------------------------------------------------------------
# What a run left in MLflow
# ---------------------------------------------------------------------------------------------------------------


def mlflow_runs(result: dg.ExecuteInProcessResult, asset: str | None = None, order_by: list[str] | None = None) -> list:
    """The MLflow runs of one Dagster run (the parent and one per materialization), or of one of its assets."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    filter_string = f"tags.`dagster.run_id` = '{result.run_id}'"
    if asset is not None:
        filter_string += f" and tags.`dagster.asset_key` = '{asset}'"
    return client.search_runs([experiment.experiment_id], filter_string=filter_string, order_by=order_by)


def mlflow_run(result: dg.ExecuteInProcessResult, asset: str):
    """The one MLflow run of ``asset``'s materialization in the Dagster run."""
    [run] = mlflow_runs(result, asset)
    return run
