"""Best against best (each side in its fastest precision, the ratio from the same rounds), the suite's fp32-only rows
and the memory table's alternated timings."""

import statistics

import pytest
import torch

import benchmarks.__main__ as suite
from benchmarks import best
from benchmarks.common import time_alternating
from benchmarks.table import render

# per-round seconds: ours is fastest in bf16 (median 2), diffusers in bf16 too (median 4); the median of the
# per-round ratios (4, 1.5, 4 -> 4) is not the ratio of the medians (4 / 2 = 2)
SAMPLES = {
    "ours fp32": [3.0, 3.0, 3.0],
    "ours bf16": [1.0, 2.0, 2.5],
    "diffusers fp32": [2.0, 6.0, 5.0],
    "diffusers bf16": [4.0, 3.0, 10.0],
}


def test_time_alternating_returns_each_rounds_samples():
    fns = {"a": lambda: None, "b": lambda: None}
    t = time_alternating(fns, rounds=4, iters=1, warmup=0, device=torch.device("cpu"))
    assert {k: len(v) for k, v in t["samples"].items()} == {"a": 4, "b": 4}
    assert t["a"] == statistics.median(t["samples"]["a"]) and "ratio" in t  # existing callers' keys unchanged


def test_each_side_gets_its_fastest_precision_and_the_ratio_is_per_round(monkeypatch):
    calls = []

    def fake_alternating(fns, rounds, iters, warmup, device):
        calls.append(sorted(fns))
        return {**{k: statistics.median(v) for k, v in SAMPLES.items()}, "samples": SAMPLES}

    monkeypatch.setattr(best, "_step_maker", lambda name, dev: ((lambda side, p: lambda: None), 4))
    monkeypatch.setattr(best, "time_alternating", fake_alternating)
    r = best.run("unet-mid", rounds=3)
    assert calls == [sorted(SAMPLES)]  # all four in one set of alternating rounds
    assert (r["precision_ours"], r["precision_diffusers"]) == ("bf16", "bf16")
    assert r["label"] == "best vs best: UNet train step (mid) — ours bf16, diffusers bf16"
    assert r["ratio"] == pytest.approx(4.0)
    assert r["ours_images_per_s"] == pytest.approx(4 / 2) and r["diffusers_images_per_s"] == pytest.approx(4 / 4)


def test_the_four_steps_start_from_identical_weights_with_their_own_optimizers():
    make, batch = best._step_maker("unet-demo", torch.device("cpu"))
    steps = {f"{s} {p}": make(s, p) for s in best.SIDES for p in best.PRECISIONS}
    assert batch == 32 and len(steps) == 4
    opts = [
        next(c.cell_contents for c in s.__closure__ if isinstance(c.cell_contents, torch.optim.Optimizer))
        for s in steps.values()
    ]
    params = [[p for g in o.param_groups for p in g["params"]] for o in opts]
    assert len({id(o) for o in opts}) == 4  # its own optimizer each
    assert len({ps[0].data_ptr() for ps in params}) == 4  # on its own copy of the weights
    totals = [sum(p.double().sum().item() for p in ps) for ps in params]
    assert all(t == pytest.approx(totals[0], rel=1e-9) for t in totals)  # identical starting weights, both sides


def _fake_suite(monkeypatch) -> list[str]:
    called: list[str] = []
    monkeypatch.setattr(suite, "measure_matmul_peak", lambda *a, **k: 1e11)
    for name in ("_model_rows", "_labelled_rows", "_best_rows", "_loader_rows"):
        monkeypatch.setattr(suite, name, lambda *a, n=name, **k: called.append(n))
    monkeypatch.setattr(
        suite.mem_bench, "run", lambda **k: called.append(f"memory threads={k['threads']}") or {"rows": []}
    )
    return called


def test_the_bf16_run_skips_the_rows_that_always_run_in_fp32(monkeypatch):
    called = _fake_suite(monkeypatch)
    r = suite.run(True, "bf16", None, "cpu", threads=3)
    assert called == ["_model_rows", "_labelled_rows"] and r["complete"]
    called.clear()
    suite.run(True, "fp32", None, "cpu", threads=3)
    assert called == ["_model_rows", "_labelled_rows", "_best_rows", "_loader_rows", "memory threads=3"]


def _result(precision: str, memory: list[dict]) -> dict:
    machine = {"cpu": "C", "cores": 2, "threads": 2, "device": "cpu", "torch": "2", "diffusers": "0", "python": "3"}
    row = {
        "row": "UNet train step (mid)",
        "ours": 3.0,
        "diffusers": 3.0,
        "ratio": 1.0,
        "unit": "img/s",
        "gflop_ours": 2.0,
        "gflop_diffusers": 2.0,
        "mfu_ours": 0.2,
        "mfu_diffusers": 0.2,
        "note": "",
    }
    return {"machine": machine, "precision": precision, "matmul_peak_flops": 1e11, "rows": [row], "memory": memory}


def test_the_table_says_a_bf16_run_has_the_model_rows_only_and_shows_the_alternated_checkpointing_cost():
    assert "always run in fp32" in render(_result("bf16", []))
    mem = [
        {
            "model": "unet-mid",
            "side": "diffusers",
            "checkpointing": False,
            "step_mb": 300.0,
            "threads": 2,
            "step_s": 1.0,
            "slowdown": None,
        },
        {
            "model": "unet-mid",
            "side": "diffusers",
            "checkpointing": True,
            "step_mb": 100.0,
            "threads": 2,
            "step_s": 1.3,
            "slowdown": 1.31,
        },
    ]
    text = render(_result("fp32", mem))
    assert "always run in fp32" not in text and "checkpointing time" in text
    assert "| unet-mid | diffusers | on | 100 | 1.30 | 1.31× |" in text
    assert "| unet-mid | diffusers | off | 300 | 1.00 |  |" in text
