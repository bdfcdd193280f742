"""The suite's output: every measured row reaches the JSON file as it is measured, and the README table is rendered
from that file (nothing typed in by hand)."""

import json

import torch

from benchmarks.__main__ import _public, _Rows
from benchmarks.common import time_alternating
from benchmarks.table import render


def _row(name: str, ours: float, ref: float | None, ratio: float | None, **extra) -> dict:
    return {
        "row": name,
        "ours": ours,
        "diffusers": ref,
        "ratio": ratio,
        "unit": "img/s",
        "gflop_ours": 2.0,
        "gflop_diffusers": 2.0,
        "mfu_ours": 0.25,
        "mfu_diffusers": 0.2,
        "note": "",
        **extra,
    }


def test_each_row_is_written_as_it_is_measured(tmp_path):
    path = tmp_path / "suite.json"
    result = {"machine": {}, "precision": "fp32", "matmul_peak_flops": 1e11, "complete": False}
    rows = result["rows"] = _Rows(result, str(path), t0=0.0)
    rows.append(_row("UNet train step (demo)", 10.0, 9.0, 1.11, detail={"big": "working data"}))
    written = json.loads(path.read_text())  # a run killed now still leaves this row
    assert [r["row"] for r in written["rows"]] == ["UNet train step (demo)"]
    assert "detail" not in written["rows"][0] and written["complete"] is False
    rows.append(_row("UNet DDIM-50 + CFG (demo)", 3.0, 2.5, 1.2))
    assert len(json.loads(path.read_text())["rows"]) == 2
    assert "detail" in result["rows"][0]  # the in-memory rows keep what later rows read
    assert all("detail" not in r for r in _public(result)["rows"])


def test_the_table_shows_each_rows_own_figures_and_flags_an_incomplete_run():
    machine = {
        "cpu": "Some CPU",
        "cores": 2,
        "threads": 2,
        "device": "cpu",
        "torch": "2.x",
        "diffusers": "0.x",
        "python": "3.12",
    }
    result = {
        "machine": machine,
        "precision": "fp32",
        "matmul_peak_flops": 3.2e11,
        "seconds": 1800,
        "complete": False,
        "rows": [
            _row("UNet train step (mid)", 3.1, 3.0, 1.03),
            _row("encode 300 images", 40.0, None, None, note="peak RSS 900 MB", gflop_ours=None),
        ],
        "memory": [{"model": "unet-mid", "side": "ours", "checkpointing": True, "step_mb": 123.4, "step_s": 1.5}],
    }
    text = render(result)
    assert "Some CPU, 2 cores" in text and "320 GFLOP/s" in text and "30 min" in text
    assert "incomplete" in text
    lines = text.splitlines()
    unet = next(line for line in lines if line.startswith("| UNet train step (mid)"))
    assert "| 3.1 | 3 | **1.03×** |" in unet and "| 25% | 20% |" in unet
    encode = next(line for line in lines if line.startswith("| encode 300 images"))
    assert "peak RSS 900 MB" in encode and "×" not in encode
    assert "| unet-mid | ours | on | 123 | 1.50 |" in text
    assert "incomplete" not in render({**result, "complete": True})
    gpu = render({**result, "datasheet_peak_flops": 6.4e11})  # twice the measured peak: half the MFU
    assert "MFU ours (datasheet)" in gpu and "| 25% | 20% | 12% | 10% |" in gpu
    assert "datasheet" not in text
    models = render(result, model_rows_only=True)
    assert "UNet train step (mid)" in models and "encode 300" not in models and "unet-mid" not in models


def test_alternating_rounds_start_with_each_side_in_turn():
    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("ours", "reference", "third")}
    time_alternating(fns, rounds=3, iters=1, warmup=0, device=torch.device("cpu"))
    firsts = [calls[3 * r] for r in range(3)]
    assert sorted(firsts) == ["ours", "reference", "third"]  # fixed order would start every round with "ours"


def test_the_table_names_each_models_size_and_both_where_they_differ():
    from benchmarks.table import _models_line

    line = _models_line(
        {"UNet mid": {"ours": 37_500_000, "diffusers": 37_500_000}, "X": {"ours": 2e6, "diffusers": 3e6}}
    )
    assert "UNet mid 37.5M both sides" in line[0]
    assert "X 2.0M ours, 3.0M diffusers" in line[0]


def test_a_result_file_is_replaced_whole(tmp_path, monkeypatch):
    """A run stopped mid-write leaves the previous complete JSON: the new one is written beside it and renamed."""
    import benchmarks.common as common

    path = tmp_path / "r.json"
    common.write_json({"a": 1}, str(path))

    def stopped(self, text):  # the process is killed halfway through writing
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(common.Path, "write_text", stopped)
    try:
        common.write_json({"a": 2}, str(path))
    except KeyboardInterrupt:
        pass
    assert json.loads(path.read_text()) == {"a": 1}
