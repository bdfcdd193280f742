"""Parity with the reference implementation (diffusers' DDPM/DDIM schedulers) for identical inputs and noise."""

import diffusers
import pytest
import torch
from diffusion_gaussian_oracle import eps_oracle, single_thread  # noqa: F401

from ldm_core.diffusion.samplers import ddim_timesteps, sample_ddim, sample_ddpm
from ldm_core.diffusion.schedules import alphas_cumprod, make_betas

MU = torch.tensor([1.5, -0.5]).view(1, 2, 1, 1)
SIGMA = torch.tensor([0.5, 2.0]).view(1, 2, 1, 1)
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
AB = alphas_cumprod(make_betas("scaled_linear", 1000))


def model(x, t):
    """Any deterministic ε-network serves; this one keeps trajectories bounded. float32 in, float32 out."""
    return eps_oracle(x, AB[int(t.reshape(-1)[0])].item(), MU, SIGMA)


def noise(seed=0):
    return torch.randn(64, 2, 3, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "schedule, theirs", [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")]
)
def test_beta_tables_match_diffusers(schedule, theirs):
    ref = diffusers.DDPMScheduler(
        beta_schedule=theirs, **({"beta_start": 0.00085, "beta_end": 0.012} if theirs == "scaled_linear" else {})
    )
    ours = make_betas(schedule, 1000)
    torch.testing.assert_close(ours.float(), ref.betas, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(alphas_cumprod(ours).float(), ref.alphas_cumprod, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("steps", [50, 30, 7, 1000])
def test_timesteps_match_diffusers(spacing, steps):
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=0)
    ref.set_timesteps(steps)
    assert ddim_timesteps(1000, steps, spacing).tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_trajectory_matches_diffusers(eta):
    steps = 50  # T/steps integral: diffusers' prev_t = t − T//steps is then our next grid point
    ref = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    # our sampler draws one N(0, I) per noisy step from the generator; hand diffusers the very same draws
    g = torch.Generator().manual_seed(1)
    draws = [torch.randn(noise().shape, generator=g) for _ in range(steps - 1)] + [torch.zeros(noise().shape)]
    x = noise()
    for i, t in enumerate(ref.timesteps):
        x = ref.step(model(x, t), t, x, eta=eta, variance_noise=draws[i]).prev_sample
    ours = sample_ddim(
        model,
        noise(),
        ddim_timesteps(1000, steps),
        alphas_cumprod=AB,
        eta=eta,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_ddpm_ancestral_matches_diffusers_with_the_same_generator():
    steps = 50
    ref = diffusers.DDPMScheduler(**SD, clip_sample=False, variance_type="fixed_small", timestep_spacing="trailing")
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(2)
    x = noise()
    for t in ref.timesteps:
        x = ref.step(model(x, t), t, x, generator=g).prev_sample
    ours = sample_ddpm(
        model, noise(), ddim_timesteps(1000, steps), alphas_cumprod=AB, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
