import diffusers
import pytest
import torch

from ldm_core.interop import from_diffusers, to_diffusers
from ldm_core.models.autoencoder import (
    AUTOENCODER_PRESETS,
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussian,
    VQModel,
    autoencoder_preset,
    build_autoencoder,
)

CONFIGS = {
    # with mid attention, two levels, 1 res block
    "attn-2lvl": AutoencoderConfig(ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_groups=8),
    # without mid attention, three levels of different widths, 2 res blocks, no quant convs, 3 latent channels
    "noattn-3lvl": AutoencoderConfig(
        ch=8,
        ch_mult=[1, 2, 3],
        num_res_blocks=2,
        z_channels=3,
        norm_groups=4,
        mid_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_diffusers_to_ours(name):
    cfg = CONFIGS[name]
    from ldm_core.interop.autoencoder import diffusers_kwargs

    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(**diffusers_kwargs(cfg)).eval()
    _randomize(theirs, 1)
    ours = from_diffusers(theirs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        d_post = theirs.encode(x).latent_dist
        o_post = ours.encode(x)
        assert _max_diff(d_post.mean, o_post.mean) <= 1e-4
        assert _max_diff(d_post.logvar, o_post.logvar) <= 1e-4
        z = torch.randn_like(o_post.mean)
        assert _max_diff(theirs.decode(z).sample, ours.decode(z)) <= 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_ours_to_diffusers(name):
    torch.manual_seed(0)
    ours = AutoencoderKL(CONFIGS[name]).eval()
    _randomize(ours, 2)
    theirs = to_diffusers(ours).eval()
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        d_post, o_post = theirs.encode(x).latent_dist, ours.encode(x)
        assert _max_diff(d_post.mean, o_post.mean) <= 1e-4
        assert _max_diff(d_post.logvar, o_post.logvar) <= 1e-4
        z = torch.randn_like(o_post.mean)
        assert _max_diff(theirs.decode(z).sample, ours.decode(z)) <= 1e-4
    # and back again: bit-identical weights
    again = from_diffusers(theirs)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_latent_scale_survives_conversion():
    cfg = CONFIGS["attn-2lvl"].model_copy(update={"scaling_factor": 0.5, "shift_factor": 0.1})
    back = from_diffusers(to_diffusers(AutoencoderKL(cfg)))
    assert back.config.scaling_factor == 0.5 and back.config.shift_factor == pytest.approx(0.1)


def test_unsupported_diffusers_config_is_refused():
    from ldm_core.interop.autoencoder import config_from_diffusers, diffusers_kwargs

    kw = diffusers_kwargs(CONFIGS["attn-2lvl"])
    kw["act_fn"] = "gelu"
    with pytest.raises(ValueError, match="act_fn"):
        config_from_diffusers(kw)


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 4, 4)
    post = DiagonalGaussian(moments)
    q = torch.distributions.Normal(post.mean, post.std)
    p = torch.distributions.Normal(torch.zeros_like(post.mean), torch.ones_like(post.std))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=[1, 2, 3])
    torch.testing.assert_close(post.kl(), expected, rtol=1e-5, atol=1e-5)


def test_logvar_is_clamped():
    moments = torch.cat([torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2, 2), -100.0)], 1)
    assert DiagonalGaussian(moments).logvar.min().item() == -30.0
    moments[:, 2:] = 100.0
    assert DiagonalGaussian(moments).logvar.max().item() == 20.0


def test_posterior_sample_statistics_and_generator():
    mean, logvar = torch.full((1, 1, 64, 64), 2.0), torch.full((1, 1, 64, 64), 2 * torch.log(torch.tensor(0.5)))
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    s = post.sample(torch.Generator().manual_seed(0))
    assert abs(s.mean().item() - 2.0) < 0.05 and abs(s.std().item() - 0.5) < 0.05
    assert torch.equal(s, post.sample(torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("preset", ["tiny", "kl-f8", "kl-f8c16", "kl-f4"])
def test_presets_shapes(preset):
    cfg = autoencoder_preset(preset)
    model = build_autoencoder(cfg)
    size = 32 if preset == "tiny" else 16
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.reconstruction.shape == (1, 3, size, size)
    assert out.posterior.mean.shape == (1, *cfg.latent_shape(size))


def test_sd1_first_stage_preset_is_the_published_shape():
    cfg = AUTOENCODER_PRESETS["kl-f8"]
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.downsample_factor) == (
        128,
        [1, 2, 4, 4],
        2,
        4,
        8,
    )
    # 83.65M parameters, as diffusers' SD-1 VAE (AutoencoderKL of runwayml/stable-diffusion-v1-5)
    n = sum(p.numel() for p in AutoencoderKL(cfg).parameters())
    assert n == 83_653_863
    assert AUTOENCODER_PRESETS["kl-f8c16"].z_channels == 16


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="norm_groups"):
        AutoencoderConfig(ch=10, norm_groups=4)
    with pytest.raises(ValueError, match="extra"):
        AutoencoderConfig(chanels=3)


def test_latent_scale_round_trip():
    cfg = autoencoder_preset("tiny", scaling_factor=0.3, shift_factor=0.2)
    model = build_autoencoder(cfg).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        z = model.encode_latents(x)
        torch.testing.assert_close(z, (model.encode(x).mean - 0.2) * 0.3)
        torch.testing.assert_close(model.decode_latents(z), model.decode(model.encode(x).mean), rtol=1e-4, atol=1e-5)


# --- VQ ablation ---------------------------------------------------------------------------------------------


def test_vq_reports_usage_and_perplexity_and_straight_through_gradient():
    torch.manual_seed(0)
    model = VQModel(autoencoder_preset("tiny-vq", n_embed=16))
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    usage, ppl = out.stats["codebook_usage"].item(), out.stats["perplexity"].item()
    assert 0.0 < usage <= 1.0 and 1.0 <= ppl <= 16.0
    assert out.reg_kind == "vq"
    # the reconstruction loss alone reaches the encoder through the straight-through estimator
    (out.reconstruction - x).abs().mean().backward()
    g = model.encoder.conv_in.weight.grad
    assert g is not None and g.abs().sum() > 0
    # the codebook gets gradient only from the codebook term
    assert model.quantize.embedding.weight.grad is None or model.quantize.embedding.weight.grad.abs().sum() == 0


def test_vq_loss_terms_closed_form():
    from ldm_core.models.autoencoder import VectorQuantizer

    vq = VectorQuantizer(n_embed=2, dim=1, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0], [1.0]]))
    z = torch.tensor([0.2, 0.9]).view(1, 1, 1, 2)
    zq, loss, stats = vq(z)
    assert torch.equal(zq.detach(), torch.tensor([0.0, 1.0]).view(1, 1, 1, 2))
    mse = ((0.2 - 0.0) ** 2 + (0.9 - 1.0) ** 2) / 2
    assert loss.item() == pytest.approx(1.25 * mse)
    assert stats["codebook_usage"].item() == 1.0 and stats["perplexity"].item() == pytest.approx(2.0)


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    """It trades memory for recomputation only: the loss and every gradient are those of the plain model."""
    torch.manual_seed(0)
    plain = build_autoencoder(autoencoder_preset("tiny", ch=16, norm_groups=8)).train()
    ckpt = build_autoencoder(plain.config.model_copy(update={"gradient_checkpointing": True})).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    losses = []
    for model in (plain, ckpt):
        out = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(2))
        loss = out.reconstruction.square().mean() + out.reg_loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=name)
