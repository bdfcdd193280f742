"""What one asset hands the next: a small typed record, written as its materialization's metadata and read back whole
by the step that needs it, from the materialization its own run made.

Each asset folder's ``record.py`` declares its record (an `AssetRecord`): the URLs, versions and values downstream
reads. Downstream never indexes metadata by string: it calls ``read_upstream(context, ImageDatasetRecord)`` and gets
an ``Upstream[ImageDatasetRecord]`` whose ``record`` has typed fields, so a renamed field fails
`tests/pipeline/test_records.py` rather than a run.

Which materialization: the deployment runs several jobs at once, each on its own data, so a step that read the
*latest* materialization could train on, check or evaluate another run's artifacts. `read_upstream` reads the one its
own run materialized, or, in a re-execution of a failed run (which skips the steps that succeeded), the one of the run
it re-executes; only when neither materialized it (a run of a subset of the assets) the latest. Each read says which,
and `lineage_metadata` puts that in the reading asset's or check's own metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, Self, TypeVar

import dagster as dg
from pydantic import BaseModel, ConfigDict, ValidationError

Source = Literal["this run", "parent run", "latest"]


class AssetRecord(BaseModel):
    """The typed output of an asset. Subclasses set ``asset`` (the asset key) and declare their fields."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    asset: ClassVar[str]

    def to_metadata(self) -> dict[str, Any]:
        """One metadata entry per field (JSON for lists and dicts, null for None), as Dagster shows and stores it."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                out[name] = dg.MetadataValue.null()
            elif isinstance(value, (dict, list)):
                out[name] = dg.MetadataValue.json(value)
            else:
                out[name] = value
        return out

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> Self:
        """The record from a materialization's metadata (values as stored, or as `MetadataValue`s)."""
        values = {k: getattr(v, "value", v) for k, v in metadata.items() if k in cls.model_fields}
        return cls.model_validate(values)


R = TypeVar("R", bound=AssetRecord)


@dataclass(frozen=True)
class Upstream(Generic[R]):
    """One upstream materialization as a step read it."""

    record: R
    run_id: str
    """The Dagster run that materialized it."""
    source: Source
    """Why this one: materialized in the reading run, in the run it re-executes, or the latest of any run."""

    @property
    def key(self) -> str:
        return self.record.asset


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


def read_upstream(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, record: type[R]) -> Upstream[R]:
    """The record of the upstream asset that a step of this run must read (see the module's docstring)."""
    key = record.asset
    found = find_upstream(context.instance, context.run, dg.AssetKey(key))
    if found is None:
        raise dg.Failure(
            f"upstream asset {key!r} has never been materialized; materialize it first", allow_retries=False
        )
    materialization, run_id, source = found
    try:
        value = record.from_metadata(dict(materialization.metadata))
    except ValidationError as e:
        missing = ", ".join(".".join(str(p) for p in err["loc"]) for err in e.errors())
        raise dg.Failure(
            f"upstream asset {key!r} (run {run_id}) has no complete {record.__name__} record ({missing}): it was "
            f"materialized by another version of this pipeline; materialize {key} again",
            allow_retries=False,
        ) from None
    if source == "latest":
        context.log.info(f"{key}: not materialized in this run; reading the latest materialization (run {run_id})")
    return Upstream(value, run_id, source)


def lineage_metadata(*reads: Upstream) -> dict[str, str]:
    """``upstream.<key>.run_id`` and ``upstream.<key>.source`` of each read, for the reader's own metadata."""
    out: dict[str, str] = {}
    for read in reads:
        out[f"upstream.{read.key}.run_id"] = read.run_id
        out[f"upstream.{read.key}.source"] = read.source
    return out


__all__ = ["AssetRecord", "Upstream", "find_upstream", "lineage_metadata", "read_upstream"]
