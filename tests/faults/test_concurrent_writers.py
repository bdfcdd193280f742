"""Two runs writing one dataset and one latent store at once, and a zombie writer (SIGSTOPped past its lease between
writing data and committing it, resumed after a second run took over), on local disk and on a real S3 endpoint.
The jobs are subprocesses (`benchmarks.faults.writers`), with a pause injected at every commit point."""

from __future__ import annotations

import pytest

from benchmarks.faults import writers


def test_two_runs_ingest_and_encode_into_one_dataset_and_store(storage_root):
    got = writers.two_writers(storage_root)
    assert got["problems"] == []


@pytest.mark.parametrize("kind", ["ingest", "encode"])
def test_a_zombie_writers_commit_is_refused_and_the_live_one_loses_nothing(storage_root, kind):
    got = writers.zombie(storage_root, kind)
    assert got["problems"] == [] and got["zombie_refused"]
