"""What a warm start buys: steps and minutes to pass the promotion gate, from scratch against from the champion.

    python -m benchmarks.warm_start [--quick] [--eval-every K] [--seed N] [--json out.json]

On the embedded data at the demo's scale (pipeline/configs/demo.yaml: its shapes source, autoencoder, latent store,
denoiser recipe and gate rules): train the autoencoder once and the denoiser from scratch for the recipe's steps, as
ldm_training_job does, gated once (the first model: thresholds only); that model is the champion. Then a new batch of
images of the same kinds lands at the source, is ingested and encoded (the autoencoder stays frozen, as in
ldm_retrain_job), and the denoiser is retrained on the grown store: from scratch, and from the champion's weights
(`train_ldm(init_weights=...)`, what `ldm_model.init_from` hands it) with the same recipe (what the sensor's
`init_from: auto` run does with the run config's recipe), and once more from the champion with the fine-tuning lr
and warmup of pipeline/configs/pretrained/champion.yaml. Every K steps the EMA model is measured as the evaluation
report measures it and judged by the gate against the champion (measured on the same held-out rows); a
run stops at its first pass. Reported: steps and minutes to pass for each (the measuring time excluded), each
check's gated metrics and the gate's reasons, and the warm / scratch ratio. The issue's goal: warm start needs at
most a third of the from-scratch steps.

``--quick`` runs the same path at toy sizes (a smoke test of the plumbing, minutes on 2 cores); its gate rarely
passes and its figures mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from benchmarks.common import machine_info, print_table, write_json
from ldm_core.bundle import TextToImage
from ldm_core.data import ImageShardDataset, IngestConfig, ingest
from ldm_core.data.latent_dataset import LatentDataset
from ldm_core.data.latent_store.encoding import encode_dataset
from ldm_core.data.latent_store.schema import LatentStoreConfig
from ldm_core.data.synthetic import write_shapes_source
from ldm_core.evaluation.evaluate import EvaluationConfig, held_out_from_dataset, measure, text_to_image_functions
from ldm_core.evaluation.gate import decide
from ldm_core.evaluation.metrics import metric_value
from ldm_core.model_io import state_dict_sha256
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig
from ldm_core.trainers.autoencoder import AutoencoderTrainingConfig, measure_latent_scale, train_autoencoder
from ldm_core.trainers.ldm import LDMTrainingConfig, train_ldm

DEMO = Path(__file__).resolve().parents[1] / "pipeline" / "configs" / "demo.yaml"
# the shipped warm-start example: its trainer's lr and warmup are the fine-tuning recipe of the fourth run
CHAMPION = Path(__file__).resolve().parents[1] / "pipeline" / "configs" / "pretrained" / "champion.yaml"
NEW_FRACTION = 0.25  # the new batch: a quarter more images (regenerated source: the old ones are unchanged)


@dataclass
class Scale:
    images: int
    vae_steps: int
    ldm_steps: int
    eval_every: int
    held_out: int
    generated: int
    sample_steps: int | None = None
    """Sampler steps of the gate's generations (None: the recipe's)."""


FULL = Scale(images=2000, vae_steps=500, ldm_steps=2000, eval_every=100, held_out=216, generated=216)
QUICK = Scale(images=160, vae_steps=20, ldm_steps=10, eval_every=10, held_out=8, generated=8, sample_steps=4)


def demo_sections() -> dict[str, Any]:
    ops = yaml.safe_load(DEMO.read_text())["ops"]
    return {k: v["config"] for k, v in ops.items()}


# ---------------------------------------------------------------------------------------------------------------
# Stage 1 and the data (what image_dataset, vae_model and latent_store do)
# ---------------------------------------------------------------------------------------------------------------


def build_autoencoder(cfg: dict, dataset_url: str, scale: Scale) -> torch.nn.Module:
    vae_cfg = copy.deepcopy(cfg["vae_model"]["training"])
    vae_cfg["trainer"]["steps"] = scale.vae_steps
    training = AutoencoderTrainingConfig.model_validate(vae_cfg)
    train = ImageShardDataset(dataset_url, split="train", resolution=cfg["vae_model"]["resolution"], cache_decoded=True)
    model = train_autoencoder(training, train, perceptual=None).model
    model.config.scaling_factor, model.config.shift_factor = measure_latent_scale(model, train, max_items=512)
    return model.eval().requires_grad_(False)


def grow(
    source: str, dataset_url: str, store_url: str, n: int, cfg: dict, vae: torch.nn.Module, text: TextEncoder
) -> None:
    """The source holds n images (the first ones unchanged); ingest and encode what is new."""
    write_shapes_source(source, n, seed=0, size=cfg["image_dataset"]["builtin_size"])
    ingest(IngestConfig(source=source, **cfg["image_dataset"]["ingest"]), dataset_url)
    store = LatentStoreConfig.model_validate(
        {**cfg["latent_store"]["store"], "resolution": cfg["vae_model"]["resolution"]}
    )
    encode_dataset(dataset_url, store_url, vae, text, store, vae_identity="benchmark-vae")


# ---------------------------------------------------------------------------------------------------------------
# Training to the gate
# ---------------------------------------------------------------------------------------------------------------


class GateWatch:
    """Measures the EMA model every K steps (as `train_ldm`'s validation hook) and stops the run at the first pass;
    the measuring time is kept apart from the training time."""

    def __init__(self, make_model, held_out, eval_cfg: EvaluationConfig, champion: dict | None):
        self.make_model, self.held_out, self.eval_cfg, self.champion = make_model, held_out, eval_cfg, champion
        self.passed_at: int | None = None
        self.metrics: dict | None = None
        self.eval_seconds = 0.0
        self.trace: list[tuple[int, bool]] = []
        self.checks: list[dict[str, Any]] = []
        """Each check's gated metrics and, on failure, the gate's reasons."""

    def sample(self, denoiser: torch.nn.Module, step: int) -> np.ndarray:
        started = time.perf_counter()
        generate_fn, reconstruct_fn = text_to_image_functions(self.make_model(denoiser))
        found = measure(
            generate_fn=generate_fn, reconstruct_fn=reconstruct_fn, held_out=self.held_out, config=self.eval_cfg
        )
        metrics = {k: m.to_dict() for k, m in found.metrics.items()}
        decision = decide(metrics, self.champion, self.eval_cfg.gate)
        passed = decision.passed
        self.trace.append((step, passed))
        self.checks.append(
            {
                "step": step,
                "passed": passed,
                "reasons": decision.reasons,
                **{k: metric_value(metrics.get(k)) for k in self.eval_cfg.gate.rules},
            }
        )
        if passed and self.passed_at is None:
            self.passed_at, self.metrics = step, metrics
        denoiser.train()
        self.eval_seconds += time.perf_counter() - started
        return np.zeros((1, 1, 3), np.uint8)  # the tracker is a null one: no grid needed

    def should_stop(self, step: int) -> bool:
        return self.passed_at is not None


def train_to_gate(
    training: LDMTrainingConfig, store_url: str, watch: GateWatch, init: dict[str, torch.Tensor] | None
) -> dict[str, Any]:
    data = LatentDataset(store_url, split="train")
    started = time.perf_counter()
    result = train_ldm(
        training, data, uncond=data.uncond(), sample_fn=watch.sample, should_stop=watch.should_stop, init_weights=init
    )
    minutes = (time.perf_counter() - started - watch.eval_seconds) / 60
    return {
        "passed_at_step": watch.passed_at,
        "steps_run": result.step,
        "train_minutes": round(minutes, 2),
        "trace": watch.trace,
        "checks": watch.checks,
        "model": result.model,
    }


_STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", flush=True)


def run(scale: Scale, eval_every: int, workdir: str, seed: int = 0) -> dict[str, Any]:
    cfg = demo_sections()
    source, dataset_url = f"{workdir}/source", f"{workdir}/dataset"
    store_v1, store_v2 = f"{workdir}/latents-v1", f"{workdir}/latents-v2"
    write_shapes_source(source, scale.images, seed=0, size=cfg["image_dataset"]["builtin_size"])
    ingest(IngestConfig(source=source, **cfg["image_dataset"]["ingest"]), dataset_url)
    say(f"{scale.images} images ingested; training the autoencoder ({scale.vae_steps} steps)")
    vae = build_autoencoder(cfg, dataset_url, scale)
    say("encoding the latent store")
    text = TextEncoder(TextEncoderConfig.model_validate(cfg["latent_store"]["text_encoder"]))
    grow(source, dataset_url, store_v1, scale.images, cfg, vae, text)

    ldm_cfg = copy.deepcopy(cfg["ldm_model"]["training"])
    ldm_cfg["trainer"].update(steps=scale.ldm_steps, validation_every=eval_every, seed=seed)
    if scale.sample_steps is not None:
        ldm_cfg["diffusion"]["sample_steps"] = scale.sample_steps
    training = LDMTrainingConfig.model_validate(ldm_cfg)
    eval_cfg = EvaluationConfig.model_validate(
        {
            **cfg["evaluation_report"]["evaluation"],
            "fid": False,
            "lpips": False,
            "generated_samples": scale.generated,
            "reconstruction_samples": scale.held_out,
        }
    )
    latent_shape = LatentDataset(store_v1, split="train")[0]["latents"].shape

    def make_model(denoiser: torch.nn.Module) -> TextToImage:
        return TextToImage(
            vae=vae,
            denoiser=denoiser,
            text_encoder=text,
            diffusion_config=training.diffusion,
            latent_shape=tuple(latent_shape),
            guidance=cfg["ldm_model"].get("guidance", 4.0),
        )

    def held_out() -> Any:
        res = cfg["vae_model"]["resolution"]
        return held_out_from_dataset(ImageShardDataset(dataset_url, split="validation", resolution=res), scale.held_out)

    # 1) the champion: the recipe's whole run on the first data, as ldm_training_job trains and registers it, then
    # gated once (thresholds only: no champion yet). Not stopped at its first pass: a model that barely passed would
    # be a champion the pipeline never makes, and its retrains would start from a marginal model
    say(f"the champion: the recipe's {scale.ldm_steps} steps")
    whole = training.model_copy(update={"trainer": training.trainer.model_copy(update={"validation_every": 0})})
    first = train_to_gate(whole, store_v1, GateWatch(make_model, held_out(), eval_cfg, None), None)
    champion = first.pop("model")

    # 2) new images of the same kinds at the source; the champion measured on the grown held-out rows
    say(f"champion gated at step {first['steps_run']}: passed {first['passed_at_step'] is not None}; the source grows")
    grow(source, dataset_url, store_v2, scale.images + int(NEW_FRACTION * scale.images), cfg, vae, text)
    rows = held_out()
    generate_fn, reconstruct_fn = text_to_image_functions(make_model(champion))
    champion_metrics = {
        k: m.to_dict()
        for k, m in measure(
            generate_fn=generate_fn, reconstruct_fn=reconstruct_fn, held_out=rows, config=eval_cfg
        ).metrics.items()
    }

    # 3) retrain twice with the same recipe: from scratch, and from the champion's weights
    init = {k: v.clone() for k, v in champion.state_dict().items()}
    say("retraining from scratch")
    scratch = train_to_gate(training, store_v2, GateWatch(make_model, rows, eval_cfg, champion_metrics), None)
    say("retraining from the champion")
    warm = train_to_gate(training, store_v2, GateWatch(make_model, rows, eval_cfg, champion_metrics), init)
    # 4) from the champion with the fine-tuning recipe of pipeline/configs/pretrained/champion.yaml (lr, warmup)
    fine = yaml.safe_load(CHAMPION.read_text())["ops"]["ldm_model"]["config"]["training"]["trainer"]
    fine_tuning = training.model_copy(
        update={"trainer": training.trainer.model_copy(update={"lr": fine["lr"], "warmup_steps": fine["warmup_steps"]})}
    )
    say(f"retraining from the champion at champion.yaml's lr {fine['lr']}, warmup {fine['warmup_steps']}")
    warm_ft = train_to_gate(fine_tuning, store_v2, GateWatch(make_model, rows, eval_cfg, champion_metrics), init)
    scratch.pop("model"), warm.pop("model"), warm_ft.pop("model")
    ratio = (
        warm["passed_at_step"] / scratch["passed_at_step"]
        if warm["passed_at_step"] and scratch["passed_at_step"]
        else None
    )
    return {
        "scale": scale.__dict__,
        "eval_every": eval_every,
        "seed": seed,
        "champion_first_run": first,
        "champion_sha256": state_dict_sha256(init),
        "retrain_from_scratch": scratch,
        "retrain_warm": warm,
        "retrain_warm_fine_tuning": warm_ft,
        "fine_tuning": {"lr": fine["lr"], "warmup_steps": fine["warmup_steps"]},
        "warm_over_scratch_steps": ratio,
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke test of the path, not a figure")
    parser.add_argument("--eval-every", type=int, default=None, help="gate check every K steps")
    parser.add_argument("--seed", type=int, default=0, help="the denoiser trainer's seed (all three runs)")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="ldm-warm-start-") as workdir:
        result = run(scale, args.eval_every or scale.eval_every, workdir, args.seed)
    rows = [
        {
            "run": name,
            "steps to pass the gate": r["passed_at_step"] or f"not within {r['steps_run']}",
            "training minutes": r["train_minutes"],
        }
        for name, r in (
            ("champion (first data, the recipe's whole run)", result["champion_first_run"]),
            ("retrain from scratch", result["retrain_from_scratch"]),
            ("retrain from the champion (same recipe)", result["retrain_warm"]),
            ("retrain from the champion (champion.yaml's lr and warmup)", result["retrain_warm_fine_tuning"]),
        )
    ]
    print_table(rows, ["run", "steps to pass the gate", "training minutes"])
    print(f"warm / scratch steps: {result['warm_over_scratch_steps']}")
    write_json(result, args.json)


if __name__ == "__main__":
    main()
