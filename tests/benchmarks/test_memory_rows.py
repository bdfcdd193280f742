"""The memory rows: the spawned processes run the requested thread count (torch's setting is per process), diffusers
gets its own gradient checkpointing too, and checkpointing's time cost comes from alternated rounds in one process."""

import os
import statistics

import pytest
import torch

from benchmarks import memory
from benchmarks.memory import measure


def test_a_spawned_measurement_runs_the_requested_threads():
    n = (os.cpu_count() or 1) + 1  # not torch's default (one per core), so a child that ignores it shows
    row = measure("unet-demo", "ours", False, "cpu", threads=n)
    assert row["threads"] == n
    assert row["step_mb"] >= 0 and "step_s" not in row  # no time from a lone step in a fresh process


def test_diffusers_has_a_checkpointing_row_with_its_checkpointing_on():
    assert ("unet-mid", "diffusers", True) in memory.CASES and len(memory.CASES) == 12
    net, _ = memory._build("unet-demo", "diffusers", True, torch.device("cpu"))
    assert net.is_gradient_checkpointing
    assert not memory._build("unet-demo", "diffusers", False, torch.device("cpu"))[0].is_gradient_checkpointing


def test_checkpointing_cost_is_four_steps_in_one_set_of_rounds_at_identical_weights(monkeypatch):
    seen = {}
    samples = {
        "ours off": [1.0, 2.0, 1.0],
        "ours on": [1.5, 2.2, 1.3],
        "diffusers off": [1.0] * 3,
        "diffusers on": [2.0, 1.0, 3.0],
    }

    def fake(fns, rounds, iters, warmup, device):
        seen["fns"] = fns
        return {**{k: statistics.median(v) for k, v in samples.items()}, "samples": samples}

    monkeypatch.setattr(memory, "time_alternating", fake)
    cost = memory.checkpointing_cost("unet-demo", rounds=3)
    assert sorted(seen["fns"]) == sorted(samples)
    opts = [
        next(c.cell_contents for c in f.__closure__ if isinstance(c.cell_contents, torch.optim.Optimizer))
        for f in seen["fns"].values()
    ]
    totals = [sum(p.double().sum().item() for g in o.param_groups for p in g["params"]) for o in opts]
    assert all(t == pytest.approx(totals[0], rel=1e-9) for t in totals)  # identical weights, both sides, off and on
    assert cost["ours"]["slowdown"] == pytest.approx(
        1.3
    )  # median of 1.5, 1.1, 1.3 per round; not 1.5 ÷ 1.0, the medians' ratio
    assert cost["diffusers"]["slowdown"] == pytest.approx(2.0)
    assert cost["ours"]["on_s"] == 1.5 and cost["diffusers"]["off_s"] == 1.0
