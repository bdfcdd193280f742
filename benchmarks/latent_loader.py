"""Latent store: can the loader feed the LDM trainer, locally and through S3, and does encoding run in flat memory?

    python -m benchmarks.latent_loader [--quick] [--json out.json]

1. Loader: stores of random tensors written through `LatentStoreWriter` (fp16, moments, Zarr and Parquet), at the
   demo size (4×8×8 latents, 16×384 MiniLM tokens) and an SD-like size (4×64×64 latents, 77×768 CLIP tokens), local
   and behind a moto S3 server (its own process, a real HTTP endpoint on loopback). `LatentDataset.get_batch` is
   timed over shuffled batches in the trainer's own order (`EpochBatchSampler`): the first epoch from a fresh
   dataset (cold: every shard is fetched and decoded) and the second (warm: served from the in-memory cache).
2. Trainer consumption: samples/s of `train_ldm` itself on in-memory tensors (so the figure is compute only): the
   tiny UNet at the demo config, and an SD-layout UNet at 64×64 latents with the width cut from 320 to 64 (the full
   SD-1 UNet consumes ~10–25× less than that on the same machine, so its ratio is a lower bound for SD-1).
3. Encoding: `encode_dataset` of N and 10·N generated 32×32 images (tiny VAE, MiniLM), each in a fresh subprocess
   that reports its own peak RSS, so the two numbers are comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from benchmarks.common import machine_info, peak_rss_bytes, print_table, write_json

DEMO = {"name": "demo", "latent": (4, 8, 8), "context": (16, 384), "rows": 4096, "rows_per_shard": 512, "batch": 32}
SD = {"name": "sd-like", "latent": (4, 64, 64), "context": (77, 768), "rows": 1024, "rows_per_shard": 128, "batch": 32}


# ---------------------------------------------------------------------------------------------------------------
# Stores of random tensors
# ---------------------------------------------------------------------------------------------------------------


def build_random_store(url: str, size: dict[str, Any], backend: str, seed: int = 0) -> float:
    """Write a store of ``size["rows"]`` random rows through the writer; returns seconds spent."""
    from ldm_core.data.latent_store.schema import LatentStoreConfig, LatentStoreMetadata
    from ldm_core.data.latent_store.writer import LatentStoreWriter

    cfg = LatentStoreConfig(backend=backend, dtype="fp16", content="moments")
    (c, h, w), (L, D) = size["latent"], size["context"]
    template = LatentStoreMetadata(
        backend=backend,
        dtype="fp16",
        content="moments",
        resolution=8 * h,
        seed=0,
        vae_identity="bench:random",
        scaling_factor=0.18215,
        shift_factor=0.0,
        text_encoder_identity="bench:random",
        latent_shape=[c, h, w],
        context_shape=[L, D],
        pooled_dim=D,
    )
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    uncond = (torch.zeros(1, L, D), torch.ones(1, L, dtype=torch.bool), torch.zeros(1, D))
    with LatentStoreWriter.open(url, template, cfg, uncond) as writer:
        _write_random_shards(writer, size, rng)
    return time.perf_counter() - t


def _write_random_shards(writer: Any, size: dict[str, Any], rng: np.random.Generator) -> None:
    from ldm_core.data.latent_store.backends import ShardColumns

    (c, h, w), (L, D) = size["latent"], size["context"]
    n, per = size["rows"], size["rows_per_shard"]
    for k, start in enumerate(range(0, n, per)):
        m = min(per, n - start)
        lengths = rng.integers(3, L + 1, m)
        rows = pa.table(
            {
                "id": [f"{start + i:016x}" for i in range(m)],
                "caption": [f"caption {start + i}" for i in range(m)],
                "split": ["train"] * m,
                "color": rng.choice(["red", "green", "blue"], m).tolist(),
            }
        )
        cols = ShardColumns(
            latents=rng.standard_normal((m, c, h, w), dtype=np.float32).astype(np.float16),
            logvar=(rng.standard_normal((m, c, h, w), dtype=np.float32) - 5).astype(np.float16),
            context=rng.standard_normal((m, L, D), dtype=np.float32).astype(np.float16),
            context_mask=np.arange(L)[None, :] < lengths[:, None],
            rows=rows,
            pooled=rng.standard_normal((m, D), dtype=np.float32).astype(np.float16),
        )
        writer.write_shard(f"shard-{k:05d}.parquet", cols, source_rows=m)


def loader_rates(url: str, batch: int, storage_options: dict[str, Any] | None = None) -> dict[str, float]:
    """Samples/s of get_batch over the trainer's shuffled order: first epoch cold, second warm."""
    from ldm_core.data.latent_dataset import LatentDataset
    from ldm_core.trainers.data_order import EpochBatchSampler

    t0 = time.perf_counter()
    data = LatentDataset(url, None, storage_options)
    sampler = EpochBatchSampler(len(data), batch, seed=0)
    first = None
    for i, b in enumerate(sampler.epoch_batches(0)):
        out = data.get_batch(b)
        if i == 0:
            first = time.perf_counter() - t0
    cold = time.perf_counter() - t0
    assert out["latents"].dtype == torch.float32 and out["latents"].shape[0] == batch
    batches = sampler.epoch_batches(1)
    t = time.perf_counter()
    reps = 0
    while time.perf_counter() - t < 1.0 or reps == 0:  # at least a second of warm batches
        for b in batches:
            data.get_batch(b)
        reps += 1
    warm = time.perf_counter() - t
    data.close()
    n_epoch = sampler.batches_per_epoch * batch
    return {
        "cold_samples_per_s": n_epoch / cold,
        "warm_samples_per_s": reps * n_epoch / warm,
        "first_batch_s": first,
        "cold_epoch_s": cold,
    }


# ---------------------------------------------------------------------------------------------------------------
# Trainer consumption
# ---------------------------------------------------------------------------------------------------------------


def trainer_rate(unet_config, latent: tuple, context: tuple, batch: int, steps: int) -> float:
    """Samples/s of train_ldm (flow matching, AdamW, EMA, fp32, CPU) on random in-memory tensors."""
    from ldm_core.data.memory import InMemoryDataset
    from ldm_core.trainers.ldm import LDMTrainingConfig, train_ldm

    n = max(2 * batch, 64)
    g = torch.Generator().manual_seed(0)
    data = InMemoryDataset(
        latents=torch.randn(n, *latent, generator=g),
        context=torch.randn(n, *context, generator=g),
        context_mask=torch.ones(n, context[0], dtype=torch.bool),
    )
    cfg = LDMTrainingConfig.model_validate(
        {
            "denoiser": unet_config.to_dict(),
            "diffusion": {"kind": "flow"},
            "trainer": {
                "steps": steps,
                "batch_size": batch,
                "ema_decay": 0.999,
                "log_every": 10**6,
                "checkpoint_every": 10**9,
                "device": "cpu",
                "precision": "fp32",
            },
        }
    )
    uncond = (torch.zeros(1, *context), torch.ones(1, context[0], dtype=torch.bool))
    warmup = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"steps": 1})})
    train_ldm(warmup, data, uncond=uncond)  # first-call allocations and kernel selection out of the timing
    return train_ldm(cfg, data, uncond=uncond).samples_per_second


# ---------------------------------------------------------------------------------------------------------------
# A moto S3 server in its own process
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        env = {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        import s3fs

        s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir("bench")
        try:
            yield "s3://bench"
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------------------------
# Encoding in a subprocess: throughput and peak RSS
# ---------------------------------------------------------------------------------------------------------------


def encode_child(dataset_url: str, store_url: str) -> dict[str, Any]:
    """Runs in a fresh process: load the models, note the peak RSS, encode, note it again."""
    from ldm_core.data.latent_store.encoding import encode_dataset
    from ldm_core.data.latent_store.schema import LatentStoreConfig
    from ldm_core.models.autoencoder import AutoencoderKL, autoencoder_preset
    from ldm_core.text_encoder import TextEncoder, TextEncoderConfig

    torch.manual_seed(0)
    vae = AutoencoderKL(autoencoder_preset("tiny"))
    text = TextEncoder(TextEncoderConfig(max_length=16))
    text.empty()
    before = peak_rss_bytes() / 2**20
    r = encode_dataset(
        dataset_url, store_url, vae, text, LatentStoreConfig(resolution=32, batch_size=128), vae_identity="bench:tiny"
    )
    return {
        "rows": r.rows_total,
        "shards": r.shards_total,
        "images_per_second": r.images_per_second,
        "seconds": r.seconds,
        "rss_before_mb": before,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
    }


def encode_runs(workdir: str, sizes: list[int], rows_per_shard: int) -> list[dict[str, Any]]:
    from ldm_core.data import IngestConfig, ingest, write_shapes_source

    out = []
    for n in sizes:
        src, ds = os.path.join(workdir, f"src{n}"), os.path.join(workdir, f"ds{n}")
        write_shapes_source(src, n, seed=0)
        ingest(IngestConfig(source=src, rows_per_shard=rows_per_shard, val_fraction=0.05), ds)
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.latent_loader",
            "--encode-child",
            ds,
            os.path.join(workdir, f"store{n}"),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def run(quick: bool = False) -> dict[str, Any]:
    from ldm_core.models.unet import UNET_PRESETS, UNetConfig

    sizes = [dict(DEMO), dict(SD)]
    if quick:
        sizes[0].update(rows=1024, rows_per_shard=256)
        sizes[1].update(rows=256, rows_per_shard=64)
    result: dict[str, Any] = {"benchmark": "latent_loader", "machine": machine_info(), "sizes": sizes}

    # 1) what the trainer consumes
    sd_small = UNetConfig(
        model_channels=64,
        channel_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attention_levels=[0, 1, 2],
        num_heads=8,
        context_dim=768,
        norm_groups=32,
    )
    # the faster of two measurements: the machine is shared, and a higher consumption makes the ratio conservative
    consume = {
        "demo": max(
            trainer_rate(UNET_PRESETS["tiny"], DEMO["latent"], DEMO["context"], DEMO["batch"], 5 if quick else 20)
            for _ in range(2)
        ),
        "sd-like": max(trainer_rate(sd_small, SD["latent"], SD["context"], 2, 2) for _ in range(2)),
    }
    result["trainer_samples_per_s"] = consume
    result["trainer_models"] = {
        "demo": "UNET_PRESETS['tiny'], batch 32, 8x8x4 latents",
        "sd-like": "SD-1 layout UNet at width 64 (SD-1: 320), batch 2, 64x64x4 latents",
    }

    # 2) what the loader delivers
    rows = []
    with tempfile.TemporaryDirectory() as tmp, moto_server() as bucket:
        for size in sizes:
            for backend in ("zarr", "parquet"):
                for where, root in (("local", tmp), ("s3", bucket)):
                    url = f"{root}/{size['name']}-{backend}"
                    write_s = build_random_store(url, size, backend)
                    r = loader_rates(url, size["batch"])
                    c = consume[size["name"]]
                    rows.append(
                        {
                            "size": size["name"],
                            "backend": backend,
                            "where": where,
                            "write_s": write_s,
                            **r,
                            "trainer_samples_per_s": c,
                            "ratio_cold": r["cold_samples_per_s"] / c,
                            "ratio_warm": r["warm_samples_per_s"] / c,
                        }
                    )
    result["loader"] = rows

    # 3) encoding throughput and memory at N and 10·N images
    with tempfile.TemporaryDirectory() as tmp:
        n = 100 if quick else 300
        result["encoding"] = encode_runs(tmp, [n, 10 * n], rows_per_shard=100)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller stores and datasets (a smoke run)")
    p.add_argument("--json", default="benchmarks/results/latent_loader.json")
    p.add_argument("--encode-child", nargs=2, metavar=("DATASET", "STORE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.encode_child:
        print(json.dumps(encode_child(*a.encode_child)))
        return None
    r = run(a.quick)
    m = r["machine"]
    print(f"machine: {m['cpu']} | {m['threads']} threads | torch {m['torch']} | device {m['device']}")
    print("\nLoader (LatentDataset.get_batch, shuffled batches of 32) vs trainer consumption (samples/s)")
    print_table(
        [
            {
                "store": f"{x['size']} {x['backend']} {x['where']}",
                "cold": f"{x['cold_samples_per_s']:,.0f}",
                "warm": f"{x['warm_samples_per_s']:,.0f}",
                "1st batch s": f"{x['first_batch_s']:.2f}",
                "trainer": f"{x['trainer_samples_per_s']:,.1f}",
                "cold ratio": f"{x['ratio_cold']:,.0f}x",
                "warm ratio": f"{x['ratio_warm']:,.0f}x",
            }
            for x in r["loader"]
        ],
        ["store", "cold", "warm", "1st batch s", "trainer", "cold ratio", "warm ratio"],
    )
    print("\nEncoding (tiny VAE + MiniLM, 32x32, fp16 Zarr), each run in its own process")
    print_table(
        [
            {
                "images": e["rows"],
                "shards": e["shards"],
                "images/s": f"{e['images_per_second']:.0f}",
                "RSS before MB": f"{e['rss_before_mb']:.0f}",
                "peak RSS MB": f"{e['peak_rss_mb']:.0f}",
                "growth MB": f"{e['peak_rss_mb'] - e['rss_before_mb']:.0f}",
            }
            for e in r["encoding"]
        ],
        ["images", "shards", "images/s", "RSS before MB", "peak RSS MB", "growth MB"],
    )
    write_json(r, a.json)
    if a.json:
        print(f"\nwrote {a.json}")
    return r


if __name__ == "__main__":
    main()
