"""Which materialization of an upstream asset a step reads: its own run's, so that runs in progress at once never mix.

The deployment runs several jobs at once (deploy/dagster.yaml), each on its own data. A step that read the upstream
asset's *latest* materialization could train on, check or evaluate another run's artifacts. `read_upstream` reads
the one its own run materialized, or, in a re-execution of a failed run (which skips the steps that succeeded), the
one of the run it re-executes; only when neither materialized it (a run of a subset of the assets) the latest. Each
read says which, and `lineage_metadata` puts that in the reading asset's or check's own metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import dagster as dg

Source = Literal["this run", "parent run", "latest"]


@dataclass(frozen=True)
class UpstreamRead:
    """One upstream materialization as a step read it."""

    key: str
    metadata: dict[str, Any]
    """Its metadata values (its exact version and URLs)."""
    run_id: str
    """The Dagster run that materialized it."""
    source: Source
    """Why this one: materialized in the reading run, in the run it re-executes, or the latest of any run."""


def _of_run(instance: dg.DagsterInstance, run_id: str, key: dg.AssetKey) -> dg.AssetMaterialization | None:
    """The last materialization of ``key`` in one run (a run that retried the step holds one per success)."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, ascending=False
    ).records
    return next((r.asset_materialization for r in records if r.asset_key == key), None)


def find_upstream(
    instance: dg.DagsterInstance, run: dg.DagsterRun, key: dg.AssetKey
) -> tuple[dg.AssetMaterialization, str, Source] | None:
    """(materialization, the run that made it, why that one) of ``key`` for a step of ``run``; None: there is none."""
    found = _of_run(instance, run.run_id, key)
    if found is not None:
        return found, run.run_id, "this run"
    # a re-execution from failure (the deployment's run_retries, or "re-execute" in the UI) skips the steps that
    # succeeded: what they materialized is in the run it re-executes, or in that one's parent
    parent_id = run.parent_run_id
    while parent_id is not None:
        found = _of_run(instance, parent_id, key)
        if found is not None:
            return found, parent_id, "parent run"
        parent = instance.get_run_by_id(parent_id)
        parent_id = parent.parent_run_id if parent is not None else None
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    return event.asset_materialization, event.run_id, "latest"


def read_upstream(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, key: str) -> UpstreamRead:
    """The materialization of the asset ``key`` that a step of this run must read (see the module's docstring)."""
    found = find_upstream(context.instance, context.run, dg.AssetKey(key))
    if found is None:
        raise dg.Failure(
            f"upstream asset {key!r} has never been materialized; materialize it first", allow_retries=False
        )
    materialization, run_id, source = found
    metadata = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
    if source == "latest":
        context.log.info(f"{key}: not materialized in this run; reading the latest materialization (run {run_id})")
    return UpstreamRead(key, metadata, run_id, source)


def lineage_metadata(*reads: UpstreamRead) -> dict[str, str]:
    """``upstream.<key>.run_id`` and ``upstream.<key>.source`` of each read, for the reader's own metadata."""
    out: dict[str, str] = {}
    for read in reads:
        out[f"upstream.{read.key}.run_id"] = read.run_id
        out[f"upstream.{read.key}.source"] = read.source
    return out


__all__ = ["UpstreamRead", "find_upstream", "lineage_metadata", "read_upstream"]
