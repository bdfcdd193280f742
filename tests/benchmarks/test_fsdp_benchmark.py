"""The FSDP benchmark's accounting: what a rank holds of parameters, gradients and AdamW state after one step, counted
in two real gloo process groups of 2 ranks, against what the model's shapes say it must be."""

import pytest

from benchmarks.fsdp import BenchSpec, full_model_bytes, measure_memory, per_rank_state
from ldm_core.models.mmdit import MMDiTConfig

N = 2
# patch 1 and 3 output channels: the final layer has 3 rows, which FSDP2 splits 2 + 1 and pads to 2 + 2
UNEVEN = BenchSpec("uneven", MMDiTConfig(preset="tiny", depth=2, patch_size=1, in_channels=3, out_channels=3), 4, 8, 2)
STEP_BYTES = 4  # fused AdamW keeps each parameter's step count as one fp32 scalar


@pytest.fixture(scope="module")
def counts() -> dict:
    return {s: measure_memory(UNEVEN, s, N) for s in ("ddp", "fsdp")}


@pytest.fixture(scope="module")
def full() -> dict:
    return full_model_bytes(UNEVEN, N)


def test_the_model_has_a_parameter_that_does_not_split_evenly(full):
    # otherwise the padding below would be untested
    assert full["padded_shard"] * N > full["full"]


def test_ddp_ranks_hold_the_whole_model(counts, full):
    for r in counts["ddp"]:
        assert r["params"] == {"local": full["full"], "held": full["full"]}
        assert r["grads"] == {"local": full["full"], "held": full["full"]}
        adam = 2 * full["full"] + STEP_BYTES * full["count"]  # exp_avg, exp_avg_sq, step
        assert r["optimizer"] == {"local": adam, "held": adam}


def test_fsdp_ranks_hold_their_shards_and_the_padding_exactly(counts, full):
    ranks = counts["fsdp"]
    assert len(ranks) == N
    # the local shards partition the model: together exactly its bytes, each rank its own part
    assert sum(r["params"]["local"] for r in ranks) == full["full"]
    assert sum(r["grads"]["local"] for r in ranks) == full["full"]
    for r in ranks:
        assert r["grads"]["local"] == r["params"]["local"]
        # AdamW's moments are shaped like the local shard (unpadded); the step count is per parameter, on every rank
        assert r["optimizer"]["local"] == 2 * r["params"]["local"] + STEP_BYTES * full["count"]
        # what the rank pays: every parameter's shard padded to ceil(rows / N) rows, the same on every rank
        assert r["params"]["held"] == full["padded_shard"]
        assert r["grads"]["held"] == full["padded_shard"]
    assert ranks[0]["params"]["local"] > ranks[1]["params"]["local"]  # the uneven rows land on rank 0


def test_fsdp_state_per_rank_is_about_one_nth_of_ddps(counts):
    ratio = per_rank_state(counts["fsdp"]) / per_rank_state(counts["ddp"])
    assert abs(ratio * N - 1) <= 0.10, ratio
