"""One real pipeline job with a tiny config, in its own process, so that a fault campaign can SIGKILL it anywhere.

    python -m benchmarks.faults.runner ae WORKDIR [--steps N]          train_autoencoder → WORKDIR/ckpt, WORKDIR/final
    python -m benchmarks.faults.runner ldm WORKDIR [--steps N]         train_ldm         → WORKDIR/ckpt, WORKDIR/final
    python -m benchmarks.faults.runner encode WORKDIR --dataset URL --store URL    encode_dataset → the store URL
    python -m benchmarks.faults.runner ingest WORKDIR --source URL --dataset URL   ingest         → the dataset URL

Resuming is rerunning the same command: the job picks up what the killed one committed (the trainers from their
checkpoint directory, encoding and ingestion from their manifests). Every input is a pure function of the arguments
(seeded synthetic data, a seeded VAE), and torch runs on one thread, so two runs of one command agree bit for bit.

Protocol on stdout, one line each, flushed: ``READY`` when the imports and inputs are done and the job's own work
begins (a kill before it tests nothing but the interpreter), ``PROGRESS <n>`` after each step / shard, and ``DONE``
when the result is committed. The campaign (`benchmarks.faults.campaign`) times its kills from READY.
"""

from __future__ import annotations

import argparse
import os
import sys

# before torch is imported: one thread (the box has 2 shared cores) and a fixed reduction order across runs
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

AE_STEPS = 12
LDM_STEPS = 12
LDM_CONTEXT = (8, 32)  # (L, D) of the synthetic caption embeddings
VAE_IDENTITY = "models:/ldm-vae/fault-campaign"


def say(line: str) -> None:
    print(line, flush=True)


def _progress(step: int) -> bool:
    # the trainers' should_stop hook, used only to report progress: returning False never changes the run
    say(f"PROGRESS {step}")
    return False


# ---------------------------------------------------------------------------------------------------------------
# Trainers
# ---------------------------------------------------------------------------------------------------------------


def ae_config(steps: int):
    from ldm_core.models.autoencoder import autoencoder_preset
    from ldm_core.trainers.autoencoder import AutoencoderTrainingConfig

    # accumulation, EMA and the discriminator (from step 2) all active: every part of the state must resume
    return AutoencoderTrainingConfig.model_validate(
        {
            "model": autoencoder_preset("tiny", ch=16, norm_groups=8).to_dict(),
            "discriminator": {"ndf": 8, "n_layers": 2, "norm": "actnorm"},
            "loss": {"disc_start": 2, "perceptual_weight": 0.0},
            "trainer": {
                "steps": steps,
                "batch_size": 4,
                "micro_batch_size": 2,
                "lr": 1e-3,
                "ema_decay": 0.9,
                "checkpoint_every": 1,
                "log_every": 1,
                "device": "cpu",
                "precision": "fp32",
            },
        }
    )


def ae_data():
    import torch

    from ldm_core.data.memory import InMemoryDataset

    g = torch.Generator().manual_seed(0)
    low = torch.rand(16, 3, 4, 4, generator=g) * 2 - 1
    return InMemoryDataset(
        image=torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    )  # (16, 3, 16, 16)


def ldm_config(steps: int):
    from ldm_core.models.unet import UNET_PRESETS
    from ldm_core.trainers.ldm import LDMTrainingConfig

    return LDMTrainingConfig.model_validate(
        {
            "denoiser": {**UNET_PRESETS["tiny"].to_dict(), "context_dim": LDM_CONTEXT[1]},
            "diffusion": {"kind": "flow"},
            "trainer": {
                "steps": steps,
                "batch_size": 8,
                "micro_batch_size": 4,
                "lr": 1e-3,
                "ema_decay": 0.9,
                "warmup_steps": 3,
                "lr_schedule": "cosine",
                "cond_dropout": 0.2,
                "checkpoint_every": 1,
                "log_every": 1,
                "device": "cpu",
                "precision": "fp32",
            },
        }
    )


def ldm_data():
    import torch

    from ldm_core.data.memory import InMemoryDataset

    g = torch.Generator().manual_seed(0)
    n, (L, D) = 24, LDM_CONTEXT
    mask = torch.arange(L).expand(n, L) < torch.randint(2, L + 1, (n, 1), generator=g)  # (n, L) ragged captions
    data = InMemoryDataset(
        latents=torch.randn(n, 4, 8, 8, generator=g), context=torch.randn(n, L, D, generator=g), context_mask=mask
    )
    uncond = (torch.zeros(1, L, D), torch.arange(L).view(1, L) < 1)
    return data, uncond


def train(job: str, data, ckpt, steps: int, stop_at: int | None = None, max_nonfinite: int | None = None):
    """Train ``job`` ("ae" or "ldm") in this process on ``data``, checkpointing to ``ckpt``; ``stop_at``: stop after
    that step, as a kill would (the checkpoint of that step committed)."""
    from ldm_core.trainers.autoencoder import train_autoencoder
    from ldm_core.trainers.ldm import train_ldm

    stop = (lambda s: s == stop_at) if stop_at else None
    if job == "ae":
        cfg = ae_config(steps)
        if max_nonfinite is not None:
            cfg.trainer.max_nonfinite_steps = max_nonfinite
        return train_autoencoder(cfg, data, checkpoint_dir=str(ckpt), perceptual=None, should_stop=stop)
    cfg = ldm_config(steps)
    if max_nonfinite is not None:
        cfg.trainer.max_nonfinite_steps = max_nonfinite
    return train_ldm(cfg, data, uncond=ldm_data()[1], checkpoint_dir=str(ckpt), should_stop=stop)


def clean_data(job: str):
    return ae_data() if job == "ae" else ldm_data()[0]


def same_weights(a, b) -> bool:
    """Whether two train results hold bit-equal weights."""
    import torch

    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def run_trainer(job: str, workdir: str, steps: int | None) -> None:
    from ldm_core.model_io import save_model

    ckpt = os.path.join(workdir, "ckpt")
    if job == "ae":
        from ldm_core.trainers.autoencoder import train_autoencoder

        cfg, data = ae_config(steps or AE_STEPS), ae_data()
        say("READY")
        result = train_autoencoder(cfg, data, checkpoint_dir=ckpt, perceptual=None, should_stop=_progress)
        model_cfg = cfg.model
    else:
        from ldm_core.trainers.ldm import train_ldm

        cfg, (data, uncond) = ldm_config(steps or LDM_STEPS), ldm_data()
        say("READY")
        result = train_ldm(cfg, data, uncond=uncond, checkpoint_dir=ckpt, should_stop=_progress)
        model_cfg = cfg.denoiser
    save_model(
        os.path.join(workdir, "final"),
        result.model,
        job,
        model_cfg,
        extra={"step": result.step, "resumed_from": result.resumed_from},
    )
    say(f"RESUMED_FROM {result.resumed_from or 0}")


# ---------------------------------------------------------------------------------------------------------------
# Encoding and ingestion
# ---------------------------------------------------------------------------------------------------------------


def encode_vae():
    import torch

    from ldm_core.models.autoencoder import AutoencoderKL, autoencoder_preset

    torch.manual_seed(0)
    return AutoencoderKL(autoencoder_preset("tiny", scaling_factor=0.7)).eval()


def run_encode(dataset_url: str, store_url: str) -> None:
    from ldm_core.data.latent_store.encoding import encode_dataset
    from ldm_core.data.latent_store.schema import LatentStoreConfig
    from ldm_core.text_encoder import TextEncoder, TextEncoderConfig

    vae = encode_vae()
    text = TextEncoder(TextEncoderConfig(max_length=8))
    cfg = LatentStoreConfig(resolution=32, batch_size=8, dtype="fp32")
    say("READY")
    encode_dataset(
        dataset_url,
        store_url,
        vae,
        text,
        cfg,
        vae_identity=VAE_IDENTITY,
        progress=lambda p: say(f"PROGRESS {p.shards_done}"),
    )


def run_ingest(source_url: str, dataset_url: str) -> None:
    from ldm_core.data import IngestConfig, ingest

    cfg = IngestConfig(source=source_url, rows_per_shard=8, val_fraction=0.25)
    say("READY")
    ingest(cfg, dataset_url)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.faults.runner", description=__doc__.split("\n")[0])
    p.add_argument("job", choices=["ae", "ldm", "encode", "ingest"])
    p.add_argument("workdir")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--dataset", help="encode: the canonical dataset to read; ingest: where to write it")
    p.add_argument("--store", help="encode: the latent store URL")
    p.add_argument("--source", help="ingest: the image-caption source URL")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    os.makedirs(args.workdir, exist_ok=True)
    if args.job in ("ae", "ldm"):
        run_trainer(args.job, args.workdir, args.steps)
    elif args.job == "encode":
        run_encode(args.dataset, args.store)
    else:
        run_ingest(args.source, args.dataset)
    say("DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
