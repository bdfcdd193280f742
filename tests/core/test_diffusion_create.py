"""create_diffusion: the config, the training draw, the loss and end-to-end sampling with exact models."""

from typing import get_args

import pytest
import torch
from diffusion_gaussian_oracle import (  # noqa: F401 (single_thread is an autouse fixture)
    assert_moments,
    eps_oracle,
    single_thread,
    v_oracle,
    velocity_oracle,
    x0_oracle,
)
from pydantic import ValidationError

from ldm_core.diffusion import (
    DIFFUSIONS,
    DiffusionConfig,
    GaussianDiffusion,
    RectifiedFlow,
    TrainingSample,
    cfg_model,
    create_diffusion,
)
from ldm_core.diffusion.objectives import min_snr_weight, snr
from ldm_core.diffusion.samplers import DDPM_SAMPLERS, SAMPLERS
from ldm_core.diffusion.schedules import shift_t

PREDICTIONS = ("eps", "v", "x0")
# Data N(μ, σ²) per channel, laid out as latents (N, C=2, 1, 1).
MU = torch.tensor([1.5, -0.5], dtype=torch.float64).view(2, 1, 1)
SIGMA = torch.tensor([0.5, 2.0], dtype=torch.float64).view(2, 1, 1)
ORACLES = {"eps": eps_oracle, "v": v_oracle, "x0": x0_oracle}


def ddpm(prediction="eps", **kw):
    return create_diffusion(DiffusionConfig(kind="ddpm", prediction=prediction, **kw))


def latents(n=32, seed=0, dtype=torch.float64):
    return torch.randn(n, 4, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


def test_config_defaults_resolve_the_sampler_and_round_trip():
    flow, dd = DiffusionConfig(), DiffusionConfig(kind="ddpm")
    assert flow.kind == "flow" and flow.sampler == "euler" and dd.sampler == "ddim"
    assert DiffusionConfig.model_validate(dd.to_dict()) == dd
    assert DiffusionConfig.model_validate(flow.to_dict()) == flow
    assert all(f.description for f in DiffusionConfig.model_fields.values()), "every field has a docstring"
    assert isinstance(create_diffusion(), RectifiedFlow) and isinstance(create_diffusion(dd), GaussianDiffusion)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"kind": "ddpm", "sampler": "euler"}, "integrates a flow"),
        ({"kind": "flow", "sampler": "ddim"}, "needs an ᾱ table"),
        ({"kind": "flow", "prediction": "v"}, "only apply to kind 'ddpm'"),
        ({"kind": "flow", "min_snr_gamma": 5.0}, "only apply to kind 'ddpm'"),
        ({"kind": "ddpm", "shift": 3.0}, "shift"),
        ({"kind": "ddpm", "sampler": "ddpm", "eta": 0.5}, "eta"),
        ({"kind": "ddpm", "schedule": "cosine", "beta_end": 0.02}, "cosine"),
        ({"kind": "ddpm", "schedule": "linear", "beta_start": 0.05, "beta_end": 0.01}, "below"),
        ({"kind": "ddpm", "num_train_timesteps": 10, "sample_steps": 20}, "exceeds"),
        ({"sampler": "dpm++"}, "sampler"),
        ({"eta": -1.0}, "eta"),
        ({"steps": 10}, "extra"),
    ],
)
def test_config_rejects_invalid_combinations(bad, message):
    with pytest.raises(ValidationError, match=message):
        DiffusionConfig(**bad)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_config_accepts_every_registered_sampler(name):
    kind = "ddpm" if name in DDPM_SAMPLERS else "flow"
    config = DiffusionConfig(kind=kind, sampler=name)
    assert config.sampler == name and DiffusionConfig.model_validate(config.to_dict()) == config


def test_config_refuses_a_sampler_the_registry_lacks_and_names_the_registered_ones():
    with pytest.raises(ValidationError) as refused:
        DiffusionConfig(sampler="dpm++")
    (error,) = refused.value.errors()
    assert error["loc"] == ("sampler",) and error["type"] == "literal_error"
    assert all(repr(name) in error["msg"] for name in SAMPLERS)


def test_every_kind_the_config_accepts_has_a_process_and_a_default_sampler_of_its_own():
    kinds = get_args(DiffusionConfig.model_fields["kind"].annotation)
    assert set(kinds) == set(DIFFUSIONS)
    for kind in kinds:
        diffusion = create_diffusion(DiffusionConfig(kind=kind))
        assert type(diffusion) is DIFFUSIONS[kind] and diffusion.config.sampler in SAMPLERS


# ---------------------------------------------------------------------------------------------------------------
# Training draw and loss
# ---------------------------------------------------------------------------------------------------------------


def test_ddpm_training_sample_shapes_ranges_and_forward_process():
    diffusion = ddpm("eps")
    x0 = latents(256)
    s = diffusion.training_sample(x0, torch.Generator().manual_seed(0))
    assert isinstance(s, TrainingSample)
    assert s.x_t.shape == s.target.shape == x0.shape and s.t_model.shape == s.weight.shape == (256,)
    assert s.t_model.dtype == torch.float32 and torch.equal(s.t_model, s.t_model.round())
    assert s.t_model.min() >= 0 and s.t_model.max() <= 999 and len(s.t_model.unique()) > 100
    assert torch.equal(s.weight, torch.ones(256))
    # the target of an eps network is the noise in x_t = √ᾱ·x0 + √(1−ᾱ)·ε
    ab = diffusion.alphas_cumprod[s.t_model.long()].view(-1, 1, 1, 1)
    torch.testing.assert_close(s.x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * s.target)


def test_flow_training_sample_shapes_ranges_and_path():
    diffusion = create_diffusion(DiffusionConfig(kind="flow", time_sampling="uniform"))
    x0 = latents(256)
    s = diffusion.training_sample(x0, torch.Generator().manual_seed(0))
    assert s.t_model.dtype == torch.float32 and s.t_model.min() >= 0 and s.t_model.max() <= 1000
    assert s.t_model.max() - s.t_model.min() > 900, "uniform times span the whole range"
    t = (s.t_model.double() / 1000).view(-1, 1, 1, 1)
    eps = s.target + x0  # the target is ε − x0
    # t_model = t·1000 is rounded to float32, so t is recovered to ~1e-7 relative
    torch.testing.assert_close(s.x_t, (1 - t) * x0 + t * eps, rtol=0, atol=1e-6)
    assert torch.equal(s.weight, torch.ones(256))
    assert abs(eps.std().item() - 1) < 0.05, "the noise is standard normal"


def test_flow_training_times_follow_shifted_logit_normal():
    """With logit(t) ~ N(0, 1) the median of t is ½; the shift is monotone, so the median becomes shift_t(½)."""
    diffusion = create_diffusion(DiffusionConfig(kind="flow", shift=3.0))
    s = diffusion.training_sample(torch.zeros(20_000, 1, 1, 1), torch.Generator().manual_seed(0))
    assert abs((s.t_model / 1000).median().item() - shift_t(0.5, 3.0)) < 0.02


def test_training_sample_is_reproducible_from_the_generator():
    for diffusion in (ddpm("v"), create_diffusion()):
        a = diffusion.training_sample(latents(8), torch.Generator().manual_seed(5))
        b = diffusion.training_sample(latents(8), torch.Generator().manual_seed(5))
        c = diffusion.training_sample(latents(8), torch.Generator().manual_seed(6))
        assert torch.equal(a.x_t, b.x_t) and torch.equal(a.t_model, b.t_model) and not torch.equal(a.x_t, c.x_t)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weights_at_the_drawn_steps(prediction):
    diffusion = ddpm(prediction, min_snr_gamma=5.0)
    s = diffusion.training_sample(latents(64), torch.Generator().manual_seed(1))
    r = snr(diffusion.alphas_cumprod[s.t_model.long()])
    torch.testing.assert_close(s.weight, min_snr_weight(r, 5.0, prediction).float())
    assert s.weight.dtype == torch.float32 and torch.all(s.weight > 0)


def test_loss_is_zero_at_the_target_and_the_weighted_mse_elsewhere():
    diffusion = ddpm("eps", min_snr_gamma=5.0)
    s = diffusion.training_sample(latents(16, dtype=torch.float32), torch.Generator().manual_seed(2))
    assert diffusion.loss(s.target.clone(), s).item() == 0.0
    pred = s.target + torch.randn(s.target.shape, generator=torch.Generator().manual_seed(3))
    manual = ((pred - s.target) ** 2).mean(dim=(1, 2, 3)) * s.weight
    torch.testing.assert_close(diffusion.loss(pred, s), manual.mean())
    assert diffusion.loss(pred.bfloat16(), s).dtype == torch.float32


@pytest.mark.parametrize("kind, prediction", [("ddpm", p) for p in PREDICTIONS] + [("flow", "eps")])
def test_a_target_consistent_prediction_recovers_x0(kind, prediction):
    diffusion = create_diffusion(DiffusionConfig(kind=kind, prediction=prediction))
    x0 = latents(64)
    s = diffusion.training_sample(x0, torch.Generator().manual_seed(4))
    torch.testing.assert_close(diffusion.denoised(s.target, s.x_t, s.t_model), x0, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Sampling through create_diffusion, with exact networks for Gaussian data
# ---------------------------------------------------------------------------------------------------------------


def noise(n=10_000, seed=0):
    return torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddpm_sample_with_an_exact_network_of_each_prediction_type(prediction):
    diffusion = ddpm(prediction, schedule="linear", sample_steps=200)
    oracle, table, times = ORACLES[prediction], diffusion.alphas_cumprod, []

    def network(x, t_model):  # the raw network output in its own parameterization
        times.append(t_model[0].item())
        return oracle(x, table[t_model.long()], MU, SIGMA)

    out = diffusion.sample(network, noise())
    assert times[0] == 999 and len(times) == 200, "trailing spacing, one call per step"
    assert_moments(out.flatten(1), MU.flatten(), SIGMA.flatten(), mean_tol=0.05, std_rtol=0.05)


def test_ddpm_ancestral_sample_through_create_diffusion_is_seeded():
    diffusion = ddpm("v", schedule="linear", sample_steps=20)
    network = lambda x, t: v_oracle(x, diffusion.alphas_cumprod[t.long()], MU, SIGMA)  # noqa: E731
    a = diffusion.sample(network, noise(8), sampler="ddpm", generator=torch.Generator().manual_seed(0))
    b = diffusion.sample(network, noise(8), sampler="ddpm", generator=torch.Generator().manual_seed(0))
    c = diffusion.sample(network, noise(8), sampler="ddim", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("sampler, steps", [("euler", 100), ("heun", 20)])
def test_flow_sample_with_the_exact_velocity_network(sampler, steps):
    diffusion = create_diffusion(DiffusionConfig(kind="flow", sampler=sampler, sample_steps=steps))
    times = []

    def network(x, t_model):  # model time is t·1000
        times.append(t_model[0].item())
        return velocity_oracle(x, t_model / 1000, MU, SIGMA)

    out = diffusion.sample(network, noise())
    assert times[0] == 1000.0 and min(times) >= 0
    assert_moments(out.flatten(1), MU.flatten(), SIGMA.flatten(), mean_tol=0.04, std_rtol=0.04)


def test_guided_denoiser_plugs_into_sample():
    """A context-blind network makes cond == uncond, so any guidance scale must give the unguided result."""
    diffusion = create_diffusion(DiffusionConfig(sample_steps=8))
    net = lambda x, t, context, mask: velocity_oracle(x, t / 1000, MU, SIGMA)  # noqa: E731
    ctx, uctx = torch.randn(16, 3, 5, dtype=torch.float64), torch.zeros(1, 3, 5, dtype=torch.float64)
    plain = diffusion.sample(lambda x, t: net(x, t, None, None), noise(16))
    guided = diffusion.sample(cfg_model(net, ctx, None, uctx, None, 4.0), noise(16))
    torch.testing.assert_close(guided, plain)


def test_sample_rejects_samplers_of_the_other_kind():
    with pytest.raises(ValueError, match="does not apply"):
        ddpm().sample(lambda x, t: x, noise(2), sampler="euler")
    with pytest.raises(ValueError, match="does not apply"):
        create_diffusion().sample(lambda x, t: x, noise(2), sampler="ddim")
    with pytest.raises(ValueError, match="eta"):
        create_diffusion().sample(lambda x, t: x, noise(2), eta=0.5)
