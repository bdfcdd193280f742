"""The README's benchmark table, rendered from one run's JSON (what `python -m benchmarks` wrote).

    python -m benchmarks.table [benchmarks/results/suite.json]

Prints markdown: the machine line, the side-by-side rows (ours, the reference, the ratio, each side's GFLOP per
item and MFU) and the memory rows. Nothing is typed in by hand: the README's table is this output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _num(v: float | None, fmt: str = ".3g") -> str:
    return "" if v is None else format(v, fmt)


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.0f}%"


def _times(v: float | None, k: float) -> float | None:
    return None if v is None else v * k


def _memory_table(rows: list[dict]) -> list[str]:
    """Step memory from fresh processes; s/step and checkpointing's time cost (on ÷ off, the median over rounds) from
    alternated rounds in one process. Rows of an older run (``step_s`` from separate processes, no slowdown) render
    with an empty slowdown."""
    lines = [
        "| train step memory | side | gradient checkpointing | step MB | s/step (alternated) | checkpointing time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        step_s = f"{r['step_s']:.2f}" if r.get("step_s") is not None else ""
        slowdown = f"{r['slowdown']:.2f}×" if r.get("slowdown") is not None else ""
        lines.append(
            f"| {r['model']} | {r['side']} | {'on' if r['checkpointing'] else 'off'} | {r['step_mb']:.0f} | {step_s} | "
            f"{slowdown} |"
        )
    return lines


def _models_line(models: dict | None) -> list[str]:
    """Each model row's parameters, ours and diffusers' (one figure where they agree), then a blank line."""
    if not models:
        return []

    def size(n: int) -> str:
        return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"

    parts = [
        f"{name} {size(c['ours'])}"
        + (" both sides" if c["ours"] == c["diffusers"] else f" ours, {size(c['diffusers'])} diffusers")
        for name, c in models.items()
    ]
    return ["Model sizes (parameters; identical weights on both sides of a model row): " + "; ".join(parts) + ".", ""]


def render(result: dict, model_rows_only: bool = False) -> str:
    """The markdown; ``model_rows_only``: just the model-level rows (those with FLOPs: where ``--precision`` applies)
    and no memory table."""
    m = result["machine"]
    minutes = result.get("seconds", 0) / 60
    sheet = result.get("datasheet_peak_flops")
    scale = result["matmul_peak_flops"] / sheet if sheet else None  # MFU vs the measured peak -> vs the datasheet's
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, device {m['device']}; torch {m['torch']}, "
        f"diffusers {m.get('diffusers')}, Python {m['python']}. Precision {result['precision']}; peak (the faster of a "
        f"matmul and a 3×3 conv) measured in the run {result['matmul_peak_flops'] / 1e9:.0f} GFLOP/s; the run took "
        f"{minutes:.0f} min"
        + ("" if result.get("complete", True) else " (incomplete: the run stopped before its last rows)")
        + (" (--quick)" if result.get("quick") else "")
        + (f"; `{result['command']}`, started {result['started']}" if result.get("started") else "")
        + ".",
        "",
        *_models_line(result.get("models")),
        "| benchmark | ours | reference | ratio | unit | GFLOP/item ours | GFLOP/item ref | MFU ours | MFU ref |"
        + (" MFU ours (datasheet) | MFU ref (datasheet) |" if scale else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if scale else ""),
    ]
    if scale:
        lines[0] += f" Datasheet peak {sheet / 1e12:.0f} TFLOP/s."
    for r in result["rows"]:
        if model_rows_only and not r.get("gflop_ours"):
            continue
        label = r["row"] + (f" — {r['note']}" if r.get("note") else "")
        ratio = f"**{r['ratio']:.2f}×**" if r.get("ratio") is not None else ""
        lines.append(
            f"| {label} | {_num(r['ours'])} | {_num(r.get('diffusers'))} | {ratio} | {r['unit']} | "
            f"{_num(r.get('gflop_ours'))} | {_num(r.get('gflop_diffusers'))} | {_pct(r.get('mfu_ours'))} | "
            f"{_pct(r.get('mfu_diffusers'))} |"
            + (
                f" {_pct(_times(r.get('mfu_ours'), scale))} | {_pct(_times(r.get('mfu_diffusers'), scale))} |"
                if scale
                else ""
            )
        )
    if result.get("memory") and not model_rows_only:
        lines += ["", *_memory_table(result["memory"])]
    if model_rows_only or result.get("precision", "fp32") != "fp32":
        lines += [
            "",
            f"{result.get('precision', 'fp32')}: the model-level rows only. The loader, encode and memory rows "
            "always run in fp32, and the best-vs-best rows time both precisions themselves: they are in the fp32 "
            "run's table (a non-fp32 run skips them).",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="?", default="benchmarks/results/suite.json")
    p.add_argument(
        "--model-rows",
        action="store_true",
        help="only the model-level rows (the ones --precision applies to; the others always run in fp32)",
    )
    a = p.parse_args(argv)
    text = render(json.loads(Path(a.json).read_text()), a.model_rows)
    print(text)
    return text


if __name__ == "__main__":
    main()
