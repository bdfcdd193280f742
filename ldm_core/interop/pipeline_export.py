"""A text-to-image bundle as a diffusers folder: ``vae/``, ``unet/`` or ``transformer/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/`` and ``model_index.json`` (the hand-over format of diffusers' training scripts).

The networks go through `to_diffusers` (same weights, same outputs); the scheduler is the diffusers class and config
that integrate our DiffusionConfig: DDIMScheduler / DDPMScheduler with our β schedule, prediction type and timestep
spacing for kind "ddpm", FlowMatchEulerDiscreteScheduler with our shift for kind "flow". A UNet bundle is written
as a StableDiffusionPipeline (no safety checker); an MMDiT bundle in SD3's layout, whose pipeline needs SD3's three
text encoders, so its components load one by one with their own classes.

What a diffusers pipeline cannot express is listed by `divergences` (in the export's output, in model_index.json
under ``_ldm_export`` and in the folder's README.md); the settings under which StableDiffusionPipeline reproduces
`TextToImage.generate` exactly are tested (tests/core/test_pipeline_export.py). diffusers is imported lazily, as in
the rest of ldm_core.interop.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm_core.bundle import TextToImage
from ldm_core.diffusion import DiffusionConfig
from ldm_core.diffusion.schedules import DEFAULT_BETA_RANGE
from ldm_core.interop import to_diffusers
from ldm_core.lora import has_lora, merged

_BETA_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
README = "README.md"


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    pipeline_class: str
    """model_index.json's ``_class_name``."""
    denoiser_dir: str
    """"unet" or "transformer"."""
    divergences: list[str]
    """Where a diffusers pipeline will not reproduce the model's own sampling; empty would mean "exactly"."""


# ---------------------------------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------------------------------


def scheduler_config(config: DiffusionConfig) -> tuple[str, dict[str, Any]]:
    """(diffusers scheduler class name, its keyword arguments) integrating ``config`` as our samplers do."""
    if config.kind == "flow":
        return "FlowMatchEulerDiscreteScheduler", {
            "num_train_timesteps": config.num_train_timesteps,
            "shift": config.shift,
        }
    kwargs: dict[str, Any] = {
        "num_train_timesteps": config.num_train_timesteps,
        "beta_schedule": _BETA_SCHEDULE[config.schedule],
        "prediction_type": _PREDICTION[config.prediction],
        "timestep_spacing": config.timestep_spacing,
        "steps_offset": 0,  # ours applies none (ldm_core.diffusion.samplers.ddim_timesteps)
        "clip_sample": False,  # ours never clips the predicted x0
    }
    if config.schedule != "cosine":
        lo, hi = DEFAULT_BETA_RANGE[config.schedule]
        kwargs |= {"beta_start": config.beta_start or lo, "beta_end": config.beta_end or hi}
    if config.sampler == "ddim":
        return "DDIMScheduler", kwargs | {"set_alpha_to_one": True}  # the last step lands on ᾱ = 1, as ours
    return "DDPMScheduler", kwargs | {"variance_type": "fixed_small"}  # β̃, the posterior variance, as ours


def build_scheduler(config: DiffusionConfig) -> Any:
    import diffusers

    name, kwargs = scheduler_config(config)
    return getattr(diffusers, name)(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# What diffusers cannot express
# ---------------------------------------------------------------------------------------------------------------


def divergences(model: TextToImage) -> list[str]:
    """One line per way a diffusers pipeline on the exported folder samples differently from ``model.generate``."""
    cfg, L = model.diffusion_config, model.text_encoder.config.max_length
    unet = model.denoiser.config.kind == "unet"
    notes = [
        f"text padding: our denoiser gives padded text tokens no attention; diffusers' pipelines pass no text "
        f"mask, so they match only for prompts that fill all {L} tokens, at guidance 1 (guidance > 1 adds the "
        f"empty prompt, which is padding)"
    ]
    if not unet:
        notes.append(
            "pipeline: StableDiffusion3Pipeline needs SD3's three text encoders (CLIP-L, CLIP-G, T5); this "
            "model has one: load transformer/, vae/, scheduler/, text_encoder/ with their own classes"
        )
    if unet and model.vae.config.shift_factor:
        notes.append(
            f"latent shift: StableDiffusionPipeline decodes latents / scaling_factor and ignores the VAE's "
            f"shift_factor={model.vae.config.shift_factor}"
        )
    if cfg.kind == "flow":
        notes.append(
            "flow grid: FlowMatchEulerDiscreteScheduler's default grid ends at t = 1/T; ours is "
            "linspace(1, 0, N + 1): pass sigmas=[1 - i / N for i in range(N)]"
        )
        if unet:
            notes.append(
                "flow in StableDiffusionPipeline: it scales the initial latents by scheduler.init_noise_sigma,"
                " which FlowMatchEulerDiscreteScheduler lacks: set pipe.scheduler.init_noise_sigma = 1.0"
            )
        if cfg.sampler == "heun":
            notes.append("sampler: the model samples with Heun (2 evaluations per step); exported as Euler")
    elif cfg.sampler == "ddpm" or cfg.eta:
        notes.append(
            f"randomness: the {cfg.sampler} sampler (eta={cfg.eta}) draws noise every step; diffusers draws "
            "its own, so only the distribution matches"
        )
    if cfg.kind == "ddpm" and cfg.timestep_spacing == "trailing":
        notes.append(
            f"timesteps: with 'trailing' spacing diffusers steps from t to t - T//N: exact only when the "
            f"number of steps N divides T = {cfg.num_train_timesteps}"
        )
    notes.append("noise: model.generate draws image i's initial latents from seed + i; pass them as latents=")
    return notes


# ---------------------------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------------------------


def _text_encoder(model: TextToImage, unet: bool) -> Any:
    """The encoder as the pipeline will run it: with the attention mask (``use_attention_mask``, which
    StableDiffusionPipeline reads), and for a UNet as a model whose first output is the token states
    (StableDiffusionPipeline takes ``output[0]``; a CLIPTextModelWithProjection's is the projected vector)."""
    encoder = copy.deepcopy(model.text_encoder.model)
    if unet and hasattr(encoder, "text_projection"):
        from transformers import CLIPTextModel

        plain = CLIPTextModel(encoder.config).to(encoder.dtype)
        # the text tower's weights, as CLIPTextModel names them (with or without its `text_model.` prefix)
        tower = {
            k.removeprefix("text_model."): v
            for k, v in encoder.state_dict().items()
            if not k.startswith("text_projection")
        }
        plain.load_state_dict(
            tower
            if "embeddings.token_embedding.weight" in plain.state_dict()
            else {f"text_model.{k}": v for k, v in tower.items()}
        )
        encoder = plain
    encoder.config.use_attention_mask = True
    return encoder.eval()


def _tokenizer(model: TextToImage) -> Any:
    """Pipelines pad and truncate to ``tokenizer.model_max_length``: ours is the config's max_length."""
    tokenizer = copy.deepcopy(model.text_encoder.tokenizer)
    tokenizer.model_max_length = model.text_encoder.config.max_length
    return tokenizer


def _denoiser(model: TextToImage) -> Any:
    # diffusers' UNet/transformer classes know no peft adapter: a LoRA-trained model is exported merged (W + s·B·A)
    plain = merged(model.denoiser) if has_lora(model.denoiser) else model.denoiser
    d = to_diffusers(plain).eval()
    if model.denoiser.config.kind == "unet":
        # the pipeline's default image size is sample_size x the VAE's factor
        d.register_to_config(sample_size=list(model.latent_shape[1:]))
    return d


# ---------------------------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------------------------


def check_output_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; choose a new one")
    return out


def export_diffusers(model: TextToImage, out_dir: str | Path) -> ExportResult:
    """Write ``model`` to ``out_dir`` (new or empty) in diffusers' layout; returns what was written and how it
    diverges."""
    from diffusers import StableDiffusionPipeline

    out = check_output_dir(out_dir)
    unet = model.denoiser.config.kind == "unet"
    notes = divergences(model)
    vae, denoiser, scheduler = to_diffusers(model.vae).eval(), _denoiser(model), build_scheduler(model.diffusion_config)
    text_encoder, tokenizer = _text_encoder(model, unet), _tokenizer(model)
    if unet:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=denoiser,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(out, safe_serialization=True)
        pipeline_class, denoiser_dir = "StableDiffusionPipeline", "unet"
    else:
        pipeline_class, denoiser_dir = "StableDiffusion3Pipeline", "transformer"
        _save_components(
            out,
            {
                "transformer": denoiser,
                "vae": vae,
                "scheduler": scheduler,
                "text_encoder": text_encoder,
                "tokenizer": tokenizer,
            },
        )
    _annotate(out, model, notes)
    return ExportResult(out, pipeline_class, denoiser_dir, notes)


def _save_components(out: Path, components: dict[str, Any]) -> None:
    """Each component in its folder, and a model_index.json in SD3's layout naming each one's library and class;
    SD3's second and third text encoders are absent (null)."""
    import diffusers

    index: dict[str, Any] = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__}
    for name, component in components.items():
        component.save_pretrained(out / name)
        library = type(component).__module__.split(".")[0]
        index[name] = [library, type(component).__name__]
    for name in (
        "text_encoder_2",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
        "image_encoder",
        "feature_extractor",
    ):
        index[name] = [None, None]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def _annotate(out: Path, model: TextToImage, notes: list[str]) -> None:
    """The divergences, machine-readable in model_index.json (diffusers ignores ``_``-prefixed keys) and in a
    README for a person."""
    index_file = out / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_ldm_export"] = {
        "diffusion": model.diffusion_config.to_dict(),
        "guidance": model.guidance,
        "latent_shape": list(model.latent_shape),
        "divergences": notes,
    }
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True))
    lines = [
        "# Exported by `ldm export`",
        "",
        f"Diffusion: {model.diffusion_config.kind}, default {model.diffusion_config.sample_steps} steps of "
        f"{model.diffusion_config.sampler}, guidance {model.guidance}; latents {tuple(model.latent_shape)}.",
        "",
        "Where a diffusers pipeline on this folder differs from the model's own sampling:",
        "",
        *[f"- {n}" for n in notes],
        "",
    ]
    (out / README).write_text("\n".join(lines))


__all__ = ["ExportResult", "build_scheduler", "check_output_dir", "divergences", "export_diffusers", "scheduler_config"]
