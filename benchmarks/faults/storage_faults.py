"""Section 5 of the fault campaign: ingestion, the Zarr latent store and trainer checkpoints on s3:// (moto) behind a
proxy that fails requests, transiently and for good."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.faults import campaign, runner
from benchmarks.faults.s3proxy import FAULTS, FaultPolicy, FaultProxy
from benchmarks.faults.table import Row, row
from benchmarks.latent_loader import moto_server
from ldm_core import storage
from ldm_core.checkpoint import CheckpointManager
from ldm_core.data import IngestConfig, ingest, write_shapes_source
from ldm_core.data.latent_store.encoding import encode_dataset
from ldm_core.data.latent_store.schema import LatentStoreConfig
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig


def storage_faults(root: Path, log: Callable[[str], None]) -> tuple[list[Row], Any]:
    rows, details = [], []
    src = root / "storage" / "src"
    write_shapes_source(str(src), 24, seed=0)
    grown = root / "storage" / "grown"
    write_shapes_source(str(grown), 32, seed=0)

    def ing(source, url):
        return ingest(IngestConfig(source=str(source), rows_per_shard=8, val_fraction=0.25), url)

    vae, text = runner.encode_vae(), TextEncoder(TextEncoderConfig(max_length=8))
    store_cfg = LatentStoreConfig(resolution=32, batch_size=8, dtype="fp32")
    ref_ds, ref_store = str(root / "storage" / "ref-ds"), str(root / "storage" / "ref-store")
    ing(src, ref_ds)
    encode_dataset(ref_ds, ref_store, vae, text, store_cfg, vae_identity=runner.VAE_IDENTITY)
    ref_ae = runner.train("ae", runner.ae_data(), root / "storage" / "ref-ckpt", steps=3)

    with moto_server() as bucket:
        upstream = os.environ["AWS_ENDPOINT_URL"]
        with FaultProxy(upstream) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            try:
                # transient faults, one kind at a time, then all mixed at a higher rate
                cases = [(k, FaultPolicy(every=3, faults=(k,), delay=0.5)) for k in FAULTS]
                cases.append(("mixed", FaultPolicy(every=2, delay=0.5)))
                for name, policy in cases:
                    t0 = time.monotonic()
                    proxy.set_policy(FaultPolicy())
                    before = dict(proxy.injected)
                    proxy.set_policy(policy)
                    base = f"{bucket}/transient-{name}"
                    checks = {}
                    try:
                        ing(src, f"{base}/ds")
                        checks["dataset"] = campaign.compare_dataset(ref_ds, f"{base}/ds")[0]
                        encode_dataset(
                            f"{base}/ds", f"{base}/store", vae, text, store_cfg, vae_identity=runner.VAE_IDENTITY
                        )
                        checks["latent store"] = campaign.compare_store(ref_store, f"{base}/store", 24)[0]
                        runner.train("ae", runner.ae_data(), f"{base}/ckpt", steps=3, stop_at=2)  # type: ignore[arg-type]
                        res = runner.train("ae", runner.ae_data(), f"{base}/ckpt", steps=3)  # type: ignore[arg-type]
                        checks["checkpoints"] = res.resumed_from == 2 and runner.same_weights(res, ref_ae)
                        error = ""
                    except Exception as e:  # a fault that was not survived is a result, not a crash of the script
                        error = f"{type(e).__name__}: {e}"
                    proxy.set_policy(FaultPolicy())
                    hit = sum(proxy.injected.values()) - sum(before.values())
                    survived = hit if checks and all(checks.values()) and not error else 0
                    rows.append(
                        row(
                            "s3 transient",
                            f"{name} (1 in {policy.every} requests)",
                            1,
                            hit,
                            survived,
                            "complete, equal to fault-free"
                            if survived == hit and not error
                            else f"FAILED {error or checks}",
                            time.monotonic() - t0,
                            "ingest + zarr latent store + trainer checkpoints/resume",
                        )
                    )
                    details.append({"case": name, "faults": hit, "checks": checks, "error": error})
                    log(f"  s3 {name}: {hit} faults, {checks} {error}")

                # permanent errors: named URL, earlier writes intact, completion once healed
                os.environ["LDM_S3_MAX_ATTEMPTS"] = "2"
                for fault, error_type in (
                    ("403", PermissionError),
                    ("nobucket", FileNotFoundError),
                    ("reset", storage.StorageError),
                    ("503", storage.StorageError),
                ):
                    t0 = time.monotonic()
                    proxy.set_policy(FaultPolicy())
                    ds, ckpt = f"{bucket}/permanent-{fault}/ds", f"{bucket}/permanent-{fault}/ckpt"
                    ing(src, ds)
                    rows_before = campaign.dataset_rows(ds)
                    mgr = CheckpointManager(ckpt)
                    mgr.save(1, {"w": torch.arange(4.0)})
                    proxy.set_policy(FaultPolicy(always=fault))
                    outcome = {}
                    for what, fn, url in (
                        ("ingest", lambda ds=ds: ing(grown, ds), ds),
                        ("checkpoint", lambda mgr=mgr: mgr.save(2, {"w": torch.zeros(4)}), ckpt),
                    ):
                        try:
                            fn()
                            outcome[what] = "no error"
                        except Exception as e:
                            outcome[what] = (
                                "named" if isinstance(e, error_type) and url in str(e) else f"{type(e).__name__}: {e}"
                            )
                    proxy.set_policy(FaultPolicy())
                    intact = campaign.dataset_rows(ds) == rows_before and mgr.load_latest()[0] == 1
                    completed = ing(grown, ds).rows_total == 32
                    good = all(v == "named" for v in outcome.values()) and intact and completed
                    rows.append(
                        row(
                            "s3 permanent",
                            f"{fault} on every request",
                            2,
                            2,
                            2 if good else 0,
                            f"{error_type.__name__} naming the URL, earlier writes intact, completes when healed"
                            if good
                            else f"FAILED {outcome} intact={intact} completed={completed}",
                            time.monotonic() - t0,
                            "LDM_S3_MAX_ATTEMPTS=2",
                        )
                    )
                    details.append(
                        {"case": f"permanent {fault}", "outcome": outcome, "intact": intact, "completed": completed}
                    )
                    log(f"  s3 permanent {fault}: {outcome}, intact {intact}, completed {completed}")
            finally:
                os.environ.pop("LDM_S3_MAX_ATTEMPTS", None)
                os.environ["AWS_ENDPOINT_URL"] = upstream
    return rows, details
