"""`export_diffusers`: a bundle as a diffusers folder that diffusers loads offline and that reproduces the bundle's
own sampling under the settings the export names (a prompt that fills max_length, guidance 1, the same latents and
steps; for flow the documented sigmas and init_noise_sigma).

The tolerance is derived, not tuned. The two implementations differ only in float rounding, measured here on the
modules and propagated (linearised) through the sampler, step by step:
  e_{k+1} = (|a_k| + |b_k|·G_net)·e_k + |b_k|·δ_net + |Δa_k|·X + |Δb_k|·E + 2u·(|a_k|·X + |b_k|·E),   e_0 = 0
where x_{k+1} = a_k·x_k + b_k·pred_k is one step of our sampler; δ_net is the measured max difference of the two
denoisers over our trajectory's inputs; G_net the denoiser's largest measured gain there (a finite difference: how
much it amplifies an error already in x); X and E the largest |x| and |pred| along our trajectory; Δa, Δb the change
of the step coefficients between our float64 ᾱ table (flow: time grid) and the scheduler's float32 one; u the
float32 unit roundoff of the update each side computes. The image error is G_vae·e_N + δ_vae (the decoder's
measured gain and the two decoders' measured difference), halved for diffusers' [0, 1] images.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, SD3Transformer2DModel
from transformers import AutoTokenizer, CLIPTextModelWithProjection

from ldm_core.bundle import load_text_to_image
from ldm_core.diffusion import DiffusionConfig, create_diffusion
from ldm_core.diffusion.guidance import cfg_model
from ldm_core.diffusion.samplers import ddim_timesteps, flow_timesteps
from ldm_core.grids import to_uint8
from ldm_core.interop.pipeline_export import build_scheduler, export_diffusers
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig
from tests.core.tiny_models import tiny_bundle, tiny_clip

FILLS_MAX_LENGTH = "a large red circle in the center of the picture"  # > 8 tokens: no padding at max_length 8
STEPS = 4  # divides T = 1000, as 'trailing' DDIM needs for an exact match
EPS32 = torch.finfo(torch.float32).eps / 2  # unit roundoff: each side rounds its own update x' = a·x + b·pred


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    tiny_clip(folder, with_projection=True)
    return TextEncoder(TextEncoderConfig(name=str(folder), max_length=8))


def _coefficients(config: DiffusionConfig, table: torch.Tensor) -> list[tuple[float, float]]:
    """(a_k, b_k) of each step x' = a·x + b·pred of our deterministic samplers: Euler on the flow velocity over the
    time grid ``table``, DDIM η = 0 with the ᾱ ``table``, written for the network's own prediction (ε or v)."""
    if config.kind == "flow":
        ts = table.double().tolist()
        return [(1.0, t1 - t0) for t0, t1 in zip(ts, ts[1:])]
    ts = ddim_timesteps(config.num_train_timesteps, STEPS, config.timestep_spacing).tolist()
    ab = table.double()
    pairs = [(float(ab[t]), float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0) for i, t in enumerate(ts)]
    if config.prediction == "v":  # x0 = √ᾱ·x − √(1−ᾱ)·v, ε = √(1−ᾱ)·x + √ᾱ·v
        return [
            ((p * a) ** 0.5 + ((1 - p) * (1 - a)) ** 0.5, ((1 - p) * a) ** 0.5 - (p * (1 - a)) ** 0.5) for a, p in pairs
        ]
    return [((p / a) ** 0.5, (1 - p) ** 0.5 - (p * (1 - a) / a) ** 0.5) for a, p in pairs]


def _gain(fn, x: torch.Tensor, h: float = 1e-3) -> float:
    """max |fn(x + h·s) − fn(x)| / h for a random sign vector s: how much fn amplifies a small error in x."""
    step = h * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))
    return (fn(x + step) - fn(x)).abs().max().item() / h


def _derived_tolerance(model, pipe, noise, ctx, mask, trace) -> float:
    cfg = model.diffusion_config
    with torch.no_grad():
        delta_net = net_gain = 0.0
        for x, t in trace["inputs"]:  # every denoiser call of our trajectory
            net = lambda x, t=t: model.denoiser(x, t, ctx, mask)  # noqa: E731
            theirs = pipe.unet(x, t, encoder_hidden_states=ctx).sample
            delta_net = max(delta_net, (net(x) - theirs).abs().max().item())
            net_gain = max(net_gain, _gain(net, x))
        if cfg.kind == "flow":
            ours_table, theirs_table = flow_timesteps(STEPS, cfg.shift), pipe.scheduler.sigmas
        else:
            ours_table, theirs_table = create_diffusion(cfg).alphas_cumprod, pipe.scheduler.alphas_cumprod
        X, E = max(trace["x"]), max(trace["pred"])
        e_z = 0.0
        for (a, b), (a2, b2) in zip(_coefficients(cfg, ours_table), _coefficients(cfg, theirs_table)):
            # the error carried (through the step and the network's response to it) plus the one made here
            e_z = (
                (abs(a) + abs(b) * net_gain) * e_z
                + abs(b) * delta_net
                + abs(a - a2) * X
                + abs(b - b2) * E
                + 2 * EPS32 * (abs(a) * X + abs(b) * E)
            )
        z, scale = trace["final"], model.vae.config.scaling_factor
        delta_vae = (model.vae.decode_latents(z) - pipe.vae.decode(z / scale).sample).abs().max().item()
        vae_gain = _gain(model.vae.decode_latents, z)
    return (vae_gain * e_z + delta_vae) / 2  # images in [0, 1]


def _ours(model, noise):
    """The bundle's own sampling at guidance 1, as generate() does it, in float (and its trace for the bound)."""
    emb = model.text_encoder.encode([FILLS_MAX_LENGTH])
    trace = {"x": [], "pred": [], "inputs": []}
    guided = cfg_model(
        model.denoiser,
        emb.embeddings,
        emb.mask,
        model.text_encoder.empty().embeddings,
        model.text_encoder.empty().mask,
        1.0,
        pooled=emb.pooled,
        uncond_pooled=model.text_encoder.empty().pooled,
    )

    def traced(x, t):
        out = guided(x, t)
        trace["inputs"].append((x.clone(), t.clone()))
        trace["x"].append(x.abs().max().item())
        trace["pred"].append(out.abs().max().item())
        return out

    with torch.no_grad():
        z = create_diffusion(model.diffusion_config).sample(traced, noise, steps=STEPS)
        trace["final"] = z
        image = (model.vae.decode_latents(z).clamp(-1, 1) + 1) / 2  # (1, 3, H, W) in [0, 1]
    return image, emb, trace


@pytest.mark.parametrize(
    "diffusion",
    [
        DiffusionConfig(kind="ddpm", prediction="eps", sampler="ddim", sample_steps=STEPS),
        DiffusionConfig(kind="ddpm", prediction="v", sampler="ddim", sample_steps=STEPS),
        DiffusionConfig(kind="flow", shift=2.0, sample_steps=STEPS),
    ],
    ids=["ddim-eps", "ddim-v", "flow-euler"],
)
def test_stable_diffusion_pipeline_reproduces_the_bundle(tmp_path, clip, diffusion):
    model = load_text_to_image(tiny_bundle(str(tmp_path / "bundle"), clip, diffusion))
    result = export_diffusers(model, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "vae",
        "unet",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "model_index.json",
    }
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")  # offline: HF_HUB_OFFLINE is set for the tests
    assert type(pipe).__name__ == result.pipeline_class == "StableDiffusionPipeline"
    assert type(pipe.scheduler).__name__ == (
        "FlowMatchEulerDiscreteScheduler" if diffusion.kind == "flow" else "DDIMScheduler"
    )

    noise = torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(0))[None]  # generate()'s seed 0
    ours, emb, trace = _ours(model, noise)
    assert emb.mask.all()  # the setting under which diffusers' unmasked attention is exact
    kw = {}
    if diffusion.kind == "flow":  # the two settings the export documents for flow
        pipe.scheduler.init_noise_sigma = 1.0
        kw["sigmas"] = [1 - i / STEPS for i in range(STEPS)]
    theirs = pipe(
        FILLS_MAX_LENGTH, num_inference_steps=STEPS, guidance_scale=1.0, latents=noise.clone(), output_type="pt", **kw
    ).images  # (1, 3, H, W) in [0, 1]
    tolerance = _derived_tolerance(model, pipe, noise, emb.embeddings, None, trace)
    assert tolerance < 1 / 255  # a bound below one uint8 level: else the comparison below would be loose
    assert (theirs - ours).abs().max().item() <= tolerance
    # and what `ldm sample` returns for that prompt and seed: equal up to rounding at a level boundary
    sampled = model.generate([FILLS_MAX_LENGTH], seed=0, steps=STEPS, guidance=1.0)
    assert np.abs(to_uint8(theirs * 2 - 1).astype(int) - sampled.astype(int)).max() <= 1


def test_the_export_names_what_diffusers_will_not_reproduce(tmp_path, clip):
    cfg = DiffusionConfig(kind="ddpm", sampler="ddpm", timestep_spacing="trailing")
    model = load_text_to_image(tiny_bundle(str(tmp_path / "bundle"), clip, cfg, vae={"shift_factor": 0.1}))
    result = export_diffusers(model, tmp_path / "out")
    topics = {n.split(":")[0] for n in result.divergences}
    assert {"text padding", "latent shift", "randomness", "timesteps", "noise"} <= topics
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_ldm_export"]["divergences"] == result.divergences
    assert index["requires_safety_checker"] is False and index["safety_checker"] == [None, None]
    assert "latent shift" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(FileExistsError, match="not an empty directory"):
        export_diffusers(model, tmp_path / "out")


def test_the_scheduler_steps_through_our_ddim_grid():
    """DDIMScheduler's timesteps for our config are ours (both spacings; steps that divide T)."""
    for spacing in ("trailing", "leading"):
        cfg = DiffusionConfig(kind="ddpm", sampler="ddim", timestep_spacing=spacing)
        scheduler = build_scheduler(cfg)
        scheduler.set_timesteps(20)
        assert scheduler.timesteps.tolist() == ddim_timesteps(1000, 20, spacing).tolist()


def test_an_mmdit_exports_components_that_load_with_their_own_classes(tmp_path, clip):
    cfg = DiffusionConfig(kind="flow", sample_steps=STEPS)
    model = load_text_to_image(tiny_bundle(str(tmp_path / "bundle"), clip, cfg, denoiser={"kind": "mmdit", "depth": 2}))
    result = export_diffusers(model, tmp_path / "out")
    assert result.denoiser_dir == "transformer" and any(n.startswith("pipeline:") for n in result.divergences)
    out = tmp_path / "out"
    transformer = SD3Transformer2DModel.from_pretrained(out / "transformer").double()
    assert type(AutoencoderKL.from_pretrained(out / "vae")).__name__ == "AutoencoderKL"
    assert type(build_scheduler(cfg)).from_pretrained(out / "scheduler").config.shift == cfg.shift
    text_encoder = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder")
    assert AutoTokenizer.from_pretrained(out / "tokenizer").model_max_length == 8
    # the same outputs as ours on the same inputs (unmasked tokens: SD3's attention takes no mask), in float64 where
    # the two differ only in summation order
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g).double(), torch.randn(2, 8, clip.dim, generator=g).double()
    pooled, t = torch.randn(2, clip.pooled_dim, generator=g).double(), torch.tensor([999.0, 250.0]).double()
    with torch.no_grad():
        ours = model.denoiser.double()(x, t, ctx, None, pooled=pooled)
        theirs = transformer(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-12)
        tok = clip.tokenizer(["a photo"], padding="max_length", max_length=8, return_tensors="pt")
        torch.testing.assert_close(text_encoder(**tok).text_embeds, clip.encode(["a photo"]).pooled, rtol=0, atol=0)
