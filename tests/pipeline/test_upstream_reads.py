"""`read_upstream` on a real Dagster instance: a step reads its own run's upstream materialization even when another
run materialized the upstream asset later; a re-execution reads its parent run's; a run that did not materialize it
reads the latest. Each read says which in the reader's metadata."""

import uuid
from collections.abc import Callable

import dagster as dg
import pytest

from pipeline.upstream import AssetRecord, find_upstream, lineage_metadata, read_upstream
from tests.common import metadata_values

# what run A's downstream step does just before its read (the test runs run B there); None: nothing
before_the_read: list[Callable[[], None]] = []


class UpConfig(dg.Config):
    label: str


class UpRecord(AssetRecord):
    asset = "up"
    label: str


@dg.asset
def up(config: UpConfig) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata=UpRecord(label=config.label).to_metadata())


@dg.asset(deps=[up])
def down(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    for step in before_the_read:
        step()
    read = read_upstream(context, UpRecord)
    return dg.MaterializeResult(metadata={"read_label": read.record.label, **lineage_metadata(read)})


DEFS = dg.Definitions(
    assets=[up, down],
    jobs=[
        dg.define_asset_job("both", selection=[up, down]),
        dg.define_asset_job("up_only", selection=[up]),
        dg.define_asset_job("down_only", selection=[down]),
    ],
)


def _config(label: str) -> dict:
    return {"ops": {"up": {"config": {"label": label}}}}


def _down_metadata(result: dg.ExecuteInProcessResult) -> dict:
    return metadata_values(result.asset_materializations_for_node("down")[0].metadata)


@pytest.fixture
def instance(tmp_path):
    with dg.DagsterInstance.local_temp(str(tmp_path)) as inst:
        yield inst


@pytest.fixture(autouse=True)
def _nothing_before_the_read():
    before_the_read.clear()
    yield
    before_the_read.clear()


def test_a_run_reads_its_own_upstream_though_another_run_materialized_it_later(instance):
    """Run A materializes `up`; between that and A's `down` reading it, run B materializes `up` (B runs inside A's
    step, so the order is fixed without threads): the latest `up` is B's, and A's `down` reads A's."""
    runs_b = []

    def run_b() -> None:
        b = DEFS.resolve_job_def("up_only").execute_in_process(run_config=_config("from B"), instance=instance)
        assert instance.get_latest_materialization_event(dg.AssetKey("up")).run_id == b.run_id
        runs_b.append(b.run_id)

    before_the_read.append(run_b)
    a = DEFS.resolve_job_def("both").execute_in_process(run_config=_config("from A"), instance=instance)
    assert len(runs_b) == 1  # B ran between A's two steps
    md = _down_metadata(a)
    assert md["read_label"] == "from A"
    assert md["upstream.up.run_id"] == a.run_id and md["upstream.up.source"] == "this run"


def test_a_run_that_did_not_materialize_the_upstream_reads_the_latest_and_says_so(instance):
    first = DEFS.resolve_job_def("up_only").execute_in_process(run_config=_config("first"), instance=instance)
    last = DEFS.resolve_job_def("up_only").execute_in_process(run_config=_config("last"), instance=instance)
    md = _down_metadata(DEFS.resolve_job_def("down_only").execute_in_process(instance=instance))
    assert first.run_id != last.run_id
    assert md["read_label"] == "last" and md["upstream.up.source"] == "latest"
    assert md["upstream.up.run_id"] == last.run_id


def test_a_re_execution_reads_what_its_parent_run_materialized(instance):
    """A run retried from its failure (deploy's run_retries) skips the steps that succeeded: their materializations
    are its parent's, and those it must read, not another run's that came later."""
    parent = DEFS.resolve_job_def("up_only").execute_in_process(run_config=_config("parent"), instance=instance)
    DEFS.resolve_job_def("up_only").execute_in_process(run_config=_config("other run, later"), instance=instance)
    retry = dg.DagsterRun(
        job_name="both", run_id=str(uuid.uuid4()), parent_run_id=parent.run_id, root_run_id=parent.run_id
    )
    instance.add_run(retry)
    materialization, run_id, source = find_upstream(instance, retry, dg.AssetKey("up"))
    assert materialization.metadata["label"].value == "parent"
    assert (run_id, source) == (parent.run_id, "parent run")
