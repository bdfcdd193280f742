"""Bad run configs, one wrong field each (on top of tests/e2e/tiny.yaml), with the field path the error must name.
Used by tests/faults/test_bad_configs.py and the fault script."""

from __future__ import annotations

V, L, S, D, E = (
    f"ops.{a}.config" for a in ("vae_model", "ldm_model", "latent_store", "image_dataset", "evaluation_report")
)

# (where, bad value, the field path the message must name)
BAD = [
    # wrong types and unknown keys: Dagster's typed config
    (f"{V}.training.trainer.steps", "many", "root:ops:vae_model:config:training:trainer:steps"),
    (f"{V}.training.trainer.stepz", 3, "stepz"),
    ("ops.vae_modle", {"config": {}}, "vae_modle"),
    ("resources.storage.config.root", 5, "root:resources:storage:config:root"),
    # values ldm_core's models refuse
    (f"{L}.training.diffusion.kind", "score", "ldm_model.training.diffusion.kind"),
    (f"{V}.training.trainer.precision", "fp8", "vae_model.training.trainer.precision"),
    (f"{V}.training.model.preset", "nope", "vae_model.training.model"),
    (f"{S}.store.backend", "hdf5", "latent_store.store.backend"),
    (f"{D}.ingest.val_fraction", 1.5, "image_dataset.ingest.val_fraction"),
    (f"{E}.evaluation.grid_size", 0, "evaluation_report.evaluation.grid_size"),
    (f"{V}.training.loss.disc_start", -5, "vae_model.training.loss.disc_start"),
    # impossible combinations inside one section
    (f"{L}.training.trainer.micro_batch_size", 3, "ldm_model.training.trainer"),  # batch 8 not divisible by 3
    (f"{V}.training.trainer.micro_batch_size", 3, "vae_model.training.trainer"),
    (f"{L}.training.diffusion.sampler", "ddim", "ldm_model.training.diffusion"),  # a DDPM sampler for a flow
    (f"{L}.training.trainer.cond_dropout", 2.0, "ldm_model.training.trainer"),
    (f"{L}.training.denoiser.num_heads", 3, "ldm_model.training.denoiser"),  # width 64 over 3 heads
    # trainer bounds (TrainerConfig refuses them; a 0 checkpoint_every would divide by zero at step 1)
    (f"{L}.training.trainer.steps", 0, "ldm_model.training.trainer.steps"),
    (f"{L}.training.trainer.lr", -1.0, "ldm_model.training.trainer.lr"),
    (f"{V}.training.trainer.checkpoint_every", 0, "vae_model.training.trainer.checkpoint_every"),
    (f"{L}.training.trainer.ema_decay", 1.5, "ldm_model.training.trainer.ema_decay"),
    (f"{L}.training.trainer.warmup_steps", -1, "ldm_model.training.trainer.warmup_steps"),
    (f"{L}.training.trainer.device", "gpu0", "ldm_model.training.trainer.device"),
    (f"{S}.text_encoder.max_length", 0, "latent_store.text_encoder.max_length"),
    (f"{D}.builtin_size", 8, "image_dataset.builtin_size"),
    (f"{D}.name", "../../etc", "image_dataset.name"),  # would leave <storage>/datasets
    (f"{L}.validation_seeds", 0, "ldm_model.validation_seeds"),
    (f"{L}.guidance", -1.0, "ldm_model.guidance"),
    ("resources.compute.config.precision", "fp4", "resources.compute.precision"),
    # combinations across assets
    (f"{L}.training.denoiser.channel_mult", [1, 2, 2, 2, 2], "ldm_model.training.denoiser.channel_mult"),  # 8×8 latent
    (f"{V}.resolution", 30, "vae_model.resolution"),  # not divisible by the VAE's factor 4
    (f"{S}.store.resolution", 30, "latent_store.store.resolution"),
    (f"{L}.training.denoiser.in_channels", 8, "ldm_model.training.denoiser.in_channels"),  # the VAE has 4
    (f"{L}.training.denoiser.context_dim", 768, "ldm_model.training.denoiser.context_dim"),  # MiniLM gives 384
    (f"{V}.training.trainer.batch_size", 64, "vae_model.training.trainer.batch_size"),  # only 48 images
]


def set_path(cfg: dict, path: str, value) -> dict:
    """Set ``value`` at the dotted ``path`` of a run config (creating sections); returns the config."""
    keys = path.split(".")
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return cfg
