"""`read_upstream` on a real Dagster instance: a step reads its own run's upstream materialization even when another
run materialized the upstream asset later; a re-execution reads its parent run's; a run that did not materialize it
reads the latest. Each read says which in the reader's metadata."""

import threading
import uuid

import dagster as dg
import pytest

from pipeline.upstream import AssetRecord, find_upstream, lineage_metadata, read_upstream
from tests.common import metadata_values

downstream_may_read = threading.Event()  # run A's downstream step waits here until run B is done


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
    assert downstream_may_read.wait(60)
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
def _closed_gate():
    downstream_may_read.clear()
    yield
    downstream_may_read.set()  # never leave a thread of a failed test waiting


def test_a_run_reads_its_own_upstream_though_another_run_materialized_it_later(instance):
    results = {}
    both, up_only = DEFS.resolve_job_def("both"), DEFS.resolve_job_def("up_only")  # resolved once, before the threads

    def run_a_in_thread() -> None:
        try:
            results["a"] = both.execute_in_process(run_config=_config("from A"), instance=instance)
        except BaseException as e:  # shown by the assertion below, not lost in the thread
            results["a_error"] = e

    run_a = threading.Thread(target=run_a_in_thread)
    run_a.start()
    # run A materialized `up` and its `down` waits; run B materializes `up` now, so the latest `up` is B's
    for _ in range(600):
        if instance.get_latest_materialization_event(dg.AssetKey("up")) is not None:
            break
        threading.Event().wait(0.1)
    b = up_only.execute_in_process(run_config=_config("from B"), instance=instance)
    assert instance.get_latest_materialization_event(dg.AssetKey("up")).run_id == b.run_id
    downstream_may_read.set()
    run_a.join(60)
    assert "a" in results, results.get("a_error")
    md = _down_metadata(results["a"])
    assert md["read_label"] == "from A"
    assert md["upstream.up.run_id"] == results["a"].run_id and md["upstream.up.source"] == "this run"


def test_a_run_that_did_not_materialize_the_upstream_reads_the_latest_and_says_so(instance):
    downstream_may_read.set()
    first = DEFS.resolve_job_def("up_only").execute_in_process(run_config=_config("first"), instance=instance)
    last = DEFS.resolve_job_def("up_only").execute_in_process(run_config=_config("last"), instance=instance)
    md = _down_metadata(DEFS.resolve_job_def("down_only").execute_in_process(instance=instance))
    assert first.run_id != last.run_id
    assert md["read_label"] == "last" and md["upstream.up.source"] == "latest"
    assert md["upstream.up.run_id"] == last.run_id


def test_a_re_execution_reads_what_its_parent_run_materialized(instance):
    """A run retried from its failure (deploy's run_retries) skips the steps that succeeded: their materializations
    are its parent's, and those it must read, not another run's that came later."""
    downstream_may_read.set()
    parent = DEFS.resolve_job_def("up_only").execute_in_process(run_config=_config("parent"), instance=instance)
    DEFS.resolve_job_def("up_only").execute_in_process(run_config=_config("other run, later"), instance=instance)
    retry = dg.DagsterRun(
        job_name="both", run_id=str(uuid.uuid4()), parent_run_id=parent.run_id, root_run_id=parent.run_id
    )
    instance.add_run(retry)
    materialization, run_id, source = find_upstream(instance, retry, dg.AssetKey("up"))
    assert materialization.metadata["label"].value == "parent"
    assert (run_id, source) == (parent.run_id, "parent run")
