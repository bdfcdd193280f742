"""The two denoiser backbones side by side on the embedded data: colour, shape and position accuracy against minutes
of training, for the demo's two stage-2 recipes (``demo.yaml``: cross-attention UNet, ε-prediction;
``demo-mmdit.yaml``: the tiny MMDiT, rectified flow).

    ldm demo                                    # once: the embedded dataset, autoencoder and latent store
    python -m benchmarks.backbones --home .ldm [--seed 0] [--every 500] [--threads 2]

Both backbones train on the same latent store with their config's trainer settings and seed. Every ``--every``
steps the run pauses (the pause is not counted as training time), the EMA weights generate the evaluation report's
216 images from the held-out captions with its seed and guidance, and the report's attribute evaluator scores them.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from ldm_core.bundle import TextToImage, load_autoencoder
from ldm_core.data import ImageShardDataset
from ldm_core.data.latent_dataset import LatentDataset
from ldm_core.evaluation.attributes import attribute_accuracy, color_confusion, confusion_lines
from ldm_core.evaluation.evaluate import EvaluationConfig, held_out_from_dataset
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig
from ldm_core.trainers.ldm import LDMTrainingConfig, train_ldm

CONFIGS = Path(__file__).resolve().parent.parent / "pipeline" / "configs"
BACKBONES = {"unet": "demo.yaml", "mmdit": "demo-mmdit.yaml"}


def _only(pattern: str) -> str:
    found = sorted(glob.glob(pattern))
    if len(found) != 1:
        raise SystemExit(
            f"expected one match for {pattern}, found {found or 'none'}: run `ldm demo` with this "
            "LDM_HOME first, and only once"
        )
    return found[0]


def training_config(
    config_file: str, store: LatentDataset, seed: int, every: int, steps: int | None = None
) -> tuple[LDMTrainingConfig, float]:
    """The run config's stage-2 training section with the store's shapes filled in (as ldm_model does)."""
    ops = yaml.safe_load((CONFIGS / config_file).read_text())["ops"]["ldm_model"]["config"]
    training = ops["training"]
    den = dict(training.get("denoiser") or {})
    c = int(store.latent_shape[0])
    den.setdefault("in_channels", c)
    den.setdefault("out_channels", c)
    den.setdefault("context_dim", int(store.context_shape[-1]))
    if den.get("kind") == "mmdit":
        den.setdefault("pooled_projection_dim", store.pooled_dim)
    training["denoiser"] = den
    training["trainer"] = {**training["trainer"], "seed": seed, "validation_every": every}
    if steps is not None:
        training["trainer"]["steps"] = steps
    return LDMTrainingConfig.model_validate(training), float(ops.get("guidance", 4.0))


def run(home: str, seed: int, every: int, threads: int, steps: int | None = None) -> list[dict]:
    torch.set_num_threads(threads)
    store_url = _only(f"{home}/storage/latents/*")
    vae = load_autoencoder(_only(f"{home}/storage/models/vae/*"))
    store = LatentDataset(store_url, split="train")
    # the demo's text encoder, which wrote the store's tokens
    demo = yaml.safe_load((CONFIGS / BACKBONES["unet"]).read_text())["ops"]["latent_store"]["config"]
    text_encoder = TextEncoder(TextEncoderConfig.model_validate(demo["text_encoder"]))
    evaluation = EvaluationConfig()
    held_out = held_out_from_dataset(
        ImageShardDataset(
            _only(f"{home}/storage/datasets/default"), split="validation", resolution=vae.config.resolution
        ),
        evaluation.generated_samples,
    )
    n = evaluation.generated_samples
    prompts = [held_out.captions[i % len(held_out.captions)] for i in range(n)]
    wanted = [held_out.attributes[i % len(held_out.attributes)] for i in range(n)]

    rows: list[dict] = []
    for backbone, config_file in BACKBONES.items():
        config, guidance = training_config(config_file, store, seed, every, steps)
        t2i = TextToImage(
            vae=vae,
            denoiser=torch.nn.Identity(),
            text_encoder=text_encoder,
            diffusion_config=config.diffusion,
            latent_shape=tuple(store.latent_shape),
            guidance=guidance,
        )
        clock = _TrainingClock()

        def evaluate_at(
            model: torch.nn.Module,
            step: int,
            backbone: str = backbone,
            t2i: TextToImage = t2i,
            clock: _TrainingClock = clock,
        ) -> np.ndarray:
            if any(r["backbone"] == backbone and r["step"] == step for r in rows):  # the end, already evaluated
                return np.zeros((1, 1, 1, 3), np.uint8)
            with clock.paused() as minutes:
                t2i.denoiser = model
                images = t2i.generate(prompts, seed=evaluation.seed)
                acc = attribute_accuracy(images, wanted)
                row = {
                    "backbone": backbone,
                    "seed": seed,
                    "threads": threads,
                    "step": step,
                    "train_minutes": round(minutes, 2),
                    **{k: round(acc[f"{k}_acc"], 3) for k in ("color", "shape", "position")},
                    "confusions": confusion_lines(color_confusion(wanted, acc["predictions"])),
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
            return images[:4]

        train_ldm(config, store, uncond=store.uncond(), sample_fn=evaluate_at)
    return rows


class _TrainingClock:
    """Minutes since creation, not counting the time spent inside ``paused()``."""

    def __init__(self) -> None:
        self.start, self.excluded = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        yield (t0 - self.start - self.excluded) / 60
        self.excluded += time.perf_counter() - t0


def print_table(rows: list[dict]) -> None:
    print("| backbone | steps | training minutes | colour | shape | position |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backbone']} | {r['step']} | {r['train_minutes']:.1f} | {r['color']:.3f} | {r['shape']:.3f} "
            f"| {r['position']:.3f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", default=".ldm", help="an LDM_HOME where `ldm demo` has run")
    p.add_argument("--seed", type=int, default=0, help="the trainers' seed")
    p.add_argument("--every", type=int, default=500, help="evaluate every N steps (and at the end)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="train this many steps instead of the config's")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    rows = run(a.home, a.seed, a.every, a.threads, a.steps)
    print_table(rows)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
