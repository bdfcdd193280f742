"""A lost rank fails the training within the collective timeout instead of hanging it, and the retry resumes from
the last complete checkpoint. The tiny LDM trains under FSDP2 (sharded DCP checkpoints, each rank writing its own
shards); the fault script (`python -m benchmarks.faults --only rank_loss`) runs the same trials at random moments,
more times, and under DDP too."""

import pytest

from benchmarks.faults import rank_loss

STEPS = 12


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return rank_loss.ldm_inputs(tmp_path_factory.mktemp("rank-loss"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault,nodes,timeout_s",
    [("kill", 1, 30.0), ("kill", 2, 30.0), ("hang", 1, 8.0)],
    ids=["sigkill-1x2", "sigkill-2x1-loopback", "sigstop-1x2"],
)
def test_a_lost_rank_fails_the_other_within_the_collective_timeout_and_the_retry_resumes(
    tmp_path, inputs, fault, nodes, timeout_s
):
    """Rank 1 of 2 SIGKILLed (dies, its connections close) or SIGSTOPped (hangs with them open) after the
    checkpoint of step 4; the collective timeout is set through the spec, as compute.collective_timeout_s sets it."""
    out = rank_loss.rank_loss_trial(
        tmp_path, inputs, fault, nodes, timeout_s=timeout_s, steps=STEPS, after_step=4, strategy="fsdp"
    )
    assert out["ranks"] == 2, out
    # rank 0 failed, within the stated timeout (plus room for its exit on a busy machine) ...
    assert out["survivor_s"] is not None, f"rank 0 still running {timeout_s + rank_loss.MARGIN_S}s after: {out}"
    assert out["survivor_s"] <= timeout_s + rank_loss.MARGIN_S, out
    if fault == "hang":  # ... and for a hung rank it was the timeout, the one that every rank was given, that did it
        assert out["survivor_s"] >= 0.9 * timeout_s and out["timed_out_in_log"], out
    # every agent failed, within torch's fixed 30 s for stopping the rest of its group: the step fails (and is
    # retried) rather than reporting success or waiting
    assert all(status not in (None, 0) for status in out["agent_status"]), out
    assert out["agents_s"] <= timeout_s + rank_loss.AGENT_STOP_S + rank_loss.MARGIN_S, out
    # the retry resumed from the newest checkpoint every rank committed, and trained to the end
    assert out["resumed_from"] == out["committed_before_rerun"] >= 4, out
    assert out["retry_status"] == [0] * nodes and out["retry_steps"] == STEPS, out.get("retry_log_tail", out)
