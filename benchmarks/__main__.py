"""The benchmark suite: ours vs diffusers at identical configs and weights, side by side in one run.

    python -m benchmarks [--quick] [--precision fp32|bf16] [--threads N] [--json benchmarks/results/suite.json]

Model rows compare like with like: identical weights, the same fused Adam(W) step on both sides, the same memory
format; each side's FLOPs are counted on its own step (on the meta device) and its MFU is its own FLOPs × its own
rate ÷ the dense matmul rate measured here, in the same run and precision. Rows where the two sides do different
work are labelled: the autoencoder's full-loss step (our single LPIPS/discriminator backward against the CompVis
double one) and "as shipped" (each side's optimizer as its training script builds it). The end-to-end rows (our
`ldm_model` loop on cached latents against diffusers' train_text_to_image.py loop, which encodes every step, with the
one-time encoding counted) have their own command and table: `python -m benchmarks.end_to_end`. Every row
is timed in alternating rounds inside this process; the ratio is the median of the per-round ratios.

The fp32 run also has the "best vs best" rows (benchmarks.best: each side's train step in its own faster precision,
both precisions of both sides timed in the same rounds; no FLOPs/MFU there, the two sides may run at different peaks).
A non-fp32 run (``--precision bf16``) has the model-level rows only: the loader, encode and memory rows always run
in fp32 and the best-vs-best rows time both precisions themselves, so they are the fp32 run's.
``--threads`` applies to this process and to the memory rows' spawned processes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime

import torch

from benchmarks import autoencoder as ae_bench
from benchmarks import best as best_bench
from benchmarks import latent_loader as ll
from benchmarks import memory as mem_bench
from benchmarks import mmdit as mmdit_bench
from benchmarks import unet as unet_bench
from benchmarks.common import THREADS_HELP, machine_info, print_table, set_threads, write_json
from ldm_core.flops import gpu_peak_flops, measure_matmul_peak, mfu


def _pair(
    row: str,
    ours: float,
    theirs: float | None,
    ratio: float | None,
    unit: str,
    flops_ours: float | None = None,
    flops_theirs: float | None = None,
    peak: float | None = None,
    note: str = "",
    **extra,
) -> dict:
    return {
        "row": row,
        "ours": ours,
        "diffusers": theirs,
        "ratio": ratio,
        "unit": unit,
        "gflop_ours": flops_ours / 1e9 if flops_ours else None,
        "gflop_diffusers": flops_theirs / 1e9 if flops_theirs else None,
        "mfu_ours": mfu(flops_ours, ours, peak) if flops_ours else None,
        "mfu_diffusers": mfu(flops_theirs, theirs, peak) if flops_theirs and theirs else None,
        "note": note,
        **extra,
    }


class _Rows(list):
    """The result's rows: each one added is printed with the time so far and the partial result written to disk, so a
    run stopped part-way (a killed process, a machine taken back) still leaves every row it measured."""

    def __init__(self, result: dict, json_path: str | None, t0: float) -> None:
        super().__init__()
        self.result, self.json_path, self.t0 = result, json_path, t0

    def append(self, row: dict) -> None:
        super().append(row)
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") is not None else "-"
        print(
            f"[{(time.time() - self.t0) / 60:5.1f} min] {row['row']}: ours {row['ours']:.3g} {row['unit']}, "
            f"ratio {ratio}",
            flush=True,
        )
        self.result["seconds"] = time.time() - self.t0
        write_json(_public(self.result), self.json_path)


def _public(result: dict) -> dict:
    """The result without the per-row working details (what the JSON file holds)."""
    return {**result, "rows": [{k: v for k, v in r.items() if k != "detail"} for r in result["rows"]]}


def _model_rows(rows: list, quick: bool, precision: str, device: str, peak: float, rounds: int) -> None:
    """Like for like, in the run's precision: the train and sampling rows of each model."""
    for name in ("demo", "mid"):
        steps = 10 if quick else 50
        r = unet_bench.run(name, rounds=rounds, iters=1, sample_steps=steps, precision=precision, device=device)
        rows.append(
            _pair(
                f"UNet train step ({name})",
                r["train_ours_images_per_s"],
                r["train_diffusers_images_per_s"],
                r["train_ratio"],
                "img/s",
                r["train_flops_ours"],
                r["train_flops_diffusers"],
                peak,
                detail=r,
            )
        )
        rows.append(
            _pair(
                f"UNet DDIM-{steps} + CFG ({name})",
                r["sample_ours_images_per_s"],
                r["sample_diffusers_images_per_s"],
                r["sample_ratio"],
                "img/s",
                r["sample_flops_ours"],
                r["sample_flops_diffusers"],
                peak,
            )
        )
    for name in ("tiny", "mid"):
        steps = 6 if quick else mmdit_bench.SAMPLE_STEPS
        r = mmdit_bench.run(name, rounds=rounds, iters=1, sample_steps=steps, precision=precision, device=device)
        rows.append(
            _pair(
                f"MMDiT train step ({name})",
                r["train_ours_images_per_s"],
                r["train_diffusers_images_per_s"],
                r["train_ratio"],
                "img/s",
                r["train_flops_ours"],
                r["train_flops_diffusers"],
                peak,
            )
        )
        rows.append(
            _pair(
                f"MMDiT Euler-{steps} + CFG ({name})",
                r["sample_ours_images_per_s"],
                r["sample_diffusers_images_per_s"],
                r["sample_ratio"],
                "img/s",
                r["sample_flops_ours"],
                r["sample_flops_diffusers"],
                peak,
            )
        )
    size = 32 if quick else 64
    a = ae_bench.run(size=size, batch=4, rounds=rounds, precision=precision, device=device)
    rows.append(
        _pair(
            f"AutoencoderKL train step ({size}px)",
            a["ours_images_per_s"],
            a["diffusers_images_per_s"],
            a["ratio"],
            "img/s",
            a["flops_ours"],
            a["flops_diffusers"],
            peak,
        )
    )


def _labelled_rows(rows: list, quick: bool, precision: str, device: str, peak: float, rounds: int) -> None:
    """Rows where the two sides do different work, labelled: as shipped, and the autoencoder's full-loss step."""
    size = 32 if quick else 64
    for name in ("demo", "mid"):
        d = next(r["detail"] for r in rows if r["row"] == f"UNet train step ({name})")
        rows.append(
            _pair(
                f"as shipped: UNet step, ours vs diffusers + torch.optim.AdamW defaults ({name})",
                d["shipped_ours_images_per_s"],
                d["shipped_diffusers_images_per_s"],
                d["shipped_ratio"],
                "img/s",
                note="different optimizers: the product, not the model",
            )
        )
    f = ae_bench.run_full_loss(size=size, batch=4, rounds=rounds, precision=precision, device=device)
    rows.append(
        _pair(
            f"algorithmic: AutoencoderKL step with LPIPS + GAN ({size}px)",
            f["ours_images_per_s"],
            f["diffusers_images_per_s"],
            f["ratio"],
            "img/s",
            f["flops_ours"],
            f["flops_diffusers"],
            peak,
            note="one LPIPS/discriminator backward vs CompVis' two",
        )
    )


def run(
    quick: bool, precision: str, json_path: str | None = None, device: str = "cpu", threads: int | None = None
) -> dict:
    """Every row; a non-fp32 run only the model-level rows (the others always run in fp32: the fp32 run has them)."""
    t0 = time.time()
    peak = measure_matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32, device=device)
    result: dict = {
        "machine": machine_info(),
        "precision": precision,
        "matmul_peak_flops": peak,
        "quick": quick,
        "complete": False,
        "device": device,
        # on a GPU, MFU against the datasheet peak too (benchmarks.table adds those columns)
        "datasheet_peak_flops": gpu_peak_flops(precision) if torch.device(device).type == "cuda" else None,
    }
    result["started"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    result["command"] = shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]])
    result["models"] = model_sizes()
    rows = result["rows"] = _Rows(result, json_path, t0)
    rounds = 3 if quick else 8

    _model_rows(rows, quick, precision, device, peak, rounds)
    _labelled_rows(rows, quick, precision, device, peak, rounds)
    if precision != "fp32":  # the rows below always run in fp32, or time both precisions: the fp32 run has them
        return _finish(result, json_path, t0)
    _best_rows(rows, quick, device)
    _loader_rows(rows, quick)
    result["memory"] = mem_bench.run(device=device, rounds=2 if quick else 3, threads=threads)["rows"]
    return _finish(result, json_path, t0)


def _best_rows(rows: list, quick: bool, device: str) -> None:
    """Best against best: each side's train step in its own fastest precision (benchmarks.best times both
    precisions of both sides itself, so these rows come in the fp32 run only). No FLOPs/MFU: the two sides may run
    in different precisions, with different peaks."""
    for name in best_bench.CONFIGS:
        b = best_bench.run(name, rounds=2 if quick else 5, device=device)
        rows.append(
            _pair(
                b["label"],
                b["ours_images_per_s"],
                b["diffusers_images_per_s"],
                b["ratio"],
                "img/s",
                note="each side in its fastest precision on this device",
                precision_ours=b["precision_ours"],
                precision_diffusers=b["precision_diffusers"],
                seconds=b["seconds"],
            )
        )


def _loader_rows(rows: list, quick: bool) -> None:
    """The latent loader against the trainer's consumption, and the encode job's rate (host work, fp32)."""
    with tempfile.TemporaryDirectory() as tmp:
        size = dict(ll.DEMO)
        if quick:
            size.update(rows=1024, rows_per_shard=256)
        ll.build_random_store(f"{tmp}/store", size, "zarr")
        rates = ll.loader_rates(f"{tmp}/store", batch=size["batch"])
        consumption = ll.trainer_rate(
            unet_bench.CONFIGS["demo"]["unet"],
            tuple(size["latent"]),
            tuple(size["context"]),
            batch=size["batch"],
            steps=10 if quick else 40,
        )
        rows.append(
            _pair(
                "latent loader vs UNet step (demo, local zarr)",
                rates["cold_samples_per_s"],
                consumption,
                rates["cold_samples_per_s"] / consumption,
                "samples/s",
                note="reference column: the trainer's consumption; ratio = loader (cold) ÷ consumption",
            )
        )
        for e in ll.encode_runs(tmp, [100, 1000] if quick else [300, 3000], rows_per_shard=100):
            rows.append(
                _pair(
                    f"encode {e['rows']} images (tiny VAE + MiniLM)",
                    e["images_per_second"],
                    None,
                    None,
                    "img/s",
                    note=f"peak RSS {e['peak_rss_mb']:.0f} MB",
                )
            )


def model_sizes() -> dict[str, dict[str, int]]:
    """Parameters of each model-row config, ours and diffusers' model (counted on the meta device): the rows compare
    identical weights, so the counts agree unless a conversion adds or drops parameters."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from ldm_core.interop.autoencoder import diffusers_kwargs as ae_kwargs
    from ldm_core.interop.mmdit import diffusers_kwargs as mmdit_kwargs
    from ldm_core.interop.unet import diffusers_kwargs as unet_kwargs
    from ldm_core.models.autoencoder import AutoencoderKL
    from ldm_core.models.mmdit import MMDiT
    from ldm_core.models.unet import UNet

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    sizes = {}
    with torch.device("meta"):
        for name, spec in unet_bench.CONFIGS.items():
            cfg = spec["unet"]
            sizes[f"UNet {name}"] = {
                "ours": count(UNet(cfg)),
                "diffusers": count(UNet2DConditionModel(**unet_kwargs(cfg))),
            }
        for name, spec in mmdit_bench.CONFIGS.items():
            cfg = spec["mmdit"]
            sizes[f"MMDiT {name}"] = {
                "ours": count(MMDiT(cfg)),
                "diffusers": count(SD3Transformer2DModel(**mmdit_kwargs(cfg))),
            }
        cfg = ae_bench.BENCH_CONFIG
        sizes["AutoencoderKL"] = {
            "ours": count(AutoencoderKL(cfg)),
            "diffusers": count(DiffusersAutoencoderKL(**ae_kwargs(cfg))),
        }
    return sizes


def _finish(result: dict, json_path: str | None, t0: float) -> dict:
    result["seconds"] = time.time() - t0
    result["complete"] = True
    write_json(_public(result), json_path)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds and smaller sizes (a smoke run)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--json", default="benchmarks/results/suite.json")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model and memory rows run (the latent-loader rows are host work)",
    )
    a = p.parse_args(argv)
    set_threads(a.threads)
    result = run(a.quick, a.precision, a.json, a.device, a.threads)
    m = result["machine"]
    print(
        f"machine: {m['cpu']} | {m['threads']} threads | torch {m['torch']} | diffusers {m.get('diffusers')} | "
        f"device {m['device']} | {a.precision} matmul peak {result['matmul_peak_flops'] / 1e9:.0f} GFLOP/s"
    )

    def pct(v: float | None) -> str:
        return f"{100 * v:.0f}%" if v is not None else ""

    def gf(v: float | None) -> str:
        return f"{v:.3g}" if v else ""

    table = [
        {
            "benchmark": r["row"],
            "ours": f"{r['ours']:.2f}",
            "diffusers / reference": f"{r['diffusers']:.2f}" if r.get("diffusers") is not None else "",
            "ratio": f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "",
            "unit": r["unit"],
            "GFLOP/item ours": gf(r["gflop_ours"]),
            "GFLOP/item ref": gf(r["gflop_diffusers"]),
            "MFU ours": pct(r["mfu_ours"]),
            "MFU ref": pct(r["mfu_diffusers"]),
            "note": r.get("note", ""),
        }
        for r in result["rows"]
    ]
    print_table(
        table,
        [
            "benchmark",
            "ours",
            "diffusers / reference",
            "ratio",
            "unit",
            "GFLOP/item ours",
            "GFLOP/item ref",
            "MFU ours",
            "MFU ref",
            "note",
        ],
    )
    if result.get("memory"):
        print()
        print_table(mem_bench.table_rows(result["memory"]), mem_bench.TABLE_COLUMNS)
    return _public(result)


if __name__ == "__main__":
    main()
