"""The autoencoder objective against closed forms and a manual autograd computation of the adaptive GAN weight.

A tiny injected perceptual stand-in (per-image mean squared error) replaces LPIPS, so no VGG is needed here.
"""

import math

import pytest
import torch
from torch import nn

from ldm_core.losses.autoencoder import (
    AutoencoderLoss,
    AutoencoderLossConfig,
    build_autoencoder_loss,
    hinge_d_loss,
    vanilla_d_loss,
)
from ldm_core.models.discriminator import DiscriminatorConfig
from ldm_core.pretrained import MissingPretrainedWeights
from tests.core.torch_home import use_torch_home

DISC = DiscriminatorConfig(ndf=8)


class MeanSquaredPerceptual(nn.Module):
    """Stand-in for LPIPS: one distance per image, (B, 1, 1, 1), differentiable in its inputs."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(2.0))  # a parameter, to check it is frozen and kept out of state

    def forward(self, x, y):
        return self.gain * ((x - y) ** 2).mean(dim=(1, 2, 3), keepdim=True)


class ToyDecoder(nn.Module):
    """latents (B, 4, 32, 32) -> images (B, 3, 32, 32); its last layer is a conv, as in the real decoder."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(torch.nn.functional.silu(self.conv_in(z)))


def setup(seed=0, **cfg):
    torch.manual_seed(seed)
    config = AutoencoderLossConfig(**{"disc_start": 10, **cfg})
    loss = AutoencoderLoss(config, DISC, MeanSquaredPerceptual())
    decoder = ToyDecoder()
    z = torch.randn(2, 4, 32, 32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    return loss, decoder, z, x


def manual_nll(x, recon, logvar, perceptual_weight, gain=2.0):
    p = gain * ((x - recon) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    rec = (x - recon).abs() + perceptual_weight * p
    return (rec / torch.exp(logvar) + logvar).sum() / x.shape[0]


def count_forwards(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


# ---------------------------------------------------------------------------------------------------------------
# Discriminator objectives
# ---------------------------------------------------------------------------------------------------------------


def test_hinge_and_vanilla_at_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-3.0, 0.0, 0.5])
    # hinge: relu(1 - real) = (0, 0.5, 2), relu(1 + fake) = (0, 1, 1.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 2.5 / 3))
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * (sum(softplus(-r) for r in real.tolist()) / 3 + sum(softplus(f) for f in fake.tolist()) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    # a perfect hinge discriminator has zero loss; at D ≡ 0 vanilla is log 2
    assert hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0.0
    assert vanilla_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("kind,fn", [("hinge", hinge_d_loss), ("vanilla", vanilla_d_loss)])
def test_discriminator_loss_is_disc_factor_times_the_objective_on_detached_inputs(kind, fn):
    loss, decoder, z, x = setup(disc_loss=kind, disc_factor=0.7)
    recon = decoder(z)
    d_loss, logs = loss.discriminator_loss(x, recon, step=10)
    with torch.no_grad():
        expected = 0.7 * fn(loss.discriminator(x), loss.discriminator(recon))
    torch.testing.assert_close(d_loss.detach(), expected)
    torch.testing.assert_close(logs["d_loss"], expected)
    d_loss.backward()
    grads = [p.grad for p in loss.discriminator.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in decoder.parameters()), "the autoencoder must not learn from D's loss"
    assert set(logs) == {"d_loss", "logits_real", "logits_fake"}


def test_discriminator_loss_refuses_before_disc_start():
    loss, decoder, z, x = setup()
    with pytest.raises(RuntimeError, match="inactive"):
        loss.discriminator_loss(x, decoder(z), step=9)


def test_disc_active_schedule():
    loss, *_ = setup(disc_start=10)
    assert [loss.disc_active(s) for s in (0, 9, 10, 11)] == [False, False, True, True]
    loss_off, *_ = setup(disc_start=0, disc_factor=0.0)
    assert not loss_off.disc_active(1000)


# ---------------------------------------------------------------------------------------------------------------
# Generator loss
# ---------------------------------------------------------------------------------------------------------------


def test_before_disc_start_the_discriminator_is_not_evaluated_and_gets_no_gradient():
    loss, decoder, z, x = setup(kl_weight=0.01, perceptual_weight=0.5)
    calls = count_forwards(loss.discriminator)
    recon = decoder(z)
    reg = torch.tensor(3.0)
    total, logs = loss.generator_loss(x, recon, reg, step=9, last_layer=decoder.conv_out.weight)
    expected_nll = manual_nll(x, recon, torch.tensor(0.0), 0.5)
    torch.testing.assert_close(logs["nll"], expected_nll.detach())
    torch.testing.assert_close(total, expected_nll + 0.01 * 3.0)
    assert logs["g"].item() == 0.0 and logs["d_weight"].item() == 0.0
    total.backward()
    assert calls == []
    assert all(p.grad is None for p in loss.discriminator.parameters())


def test_adaptive_weight_matches_manual_autograd():
    loss, decoder, z, x = setup(kl_weight=0.01, perceptual_weight=0.5, disc_weight=0.8, disc_factor=0.9)
    # float64, so the comparison measures the formula rather than summation order
    loss, decoder, z, x = loss.double(), decoder.double(), z.double(), x.double()
    last = decoder.conv_out.weight
    recon = decoder(z)
    reg = torch.tensor(1.5, dtype=torch.float64)
    total, logs = loss.generator_loss(x, recon, reg, step=10, last_layer=last)

    # manual: the same quantities with plain autograd
    nll = manual_nll(x, recon, torch.tensor(0.0, dtype=torch.float64), 0.5)
    g = -loss.discriminator(recon).mean()
    grad_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = 0.8 * torch.clamp(grad_nll.norm() / (grad_g.norm() + 1e-4), 0, 1e4)
    assert d_weight.item() > 0
    torch.testing.assert_close(logs["d_weight"], d_weight, rtol=1e-10, atol=0)
    torch.testing.assert_close(logs["g"], g.detach())
    manual_total = nll + 0.01 * reg + d_weight.detach() * 0.9 * g
    torch.testing.assert_close(total, manual_total, rtol=1e-10, atol=1e-12)

    # the decoder's gradient is that of the manual total, with the adaptive weight held constant
    expected = torch.autograd.grad(manual_total, list(decoder.parameters()), retain_graph=True)
    total.backward()
    for p, e in zip(decoder.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)


def test_generator_step_leaves_the_discriminator_without_gradient_and_restores_its_flags():
    loss, decoder, z, x = setup()
    loss.discriminator.main[0].bias.requires_grad_(False)  # a flag that must come back as it was
    calls = count_forwards(loss.discriminator)
    total, _ = loss.generator_loss(x, decoder(z), torch.tensor(0.0), step=10, last_layer=decoder.conv_out.weight)
    total.backward()
    assert calls == [1]
    assert all(p.grad is None for p in loss.discriminator.parameters())
    flags = [p.requires_grad for p in loss.discriminator.parameters()]
    assert flags[1] is False and flags[0] and all(flags[2:])


def test_adaptive_weight_closed_form_and_clamp():
    loss, *_ = setup(disc_weight=0.5)
    w = nn.Parameter(torch.randn(3, 3, 3, 3))
    n = w.numel()
    # nll = a·Σw, g = b·Σw  =>  ‖∇nll‖ = |a|√n, ‖∇g‖ = |b|√n
    a, b = 2.0, 0.5
    got = loss.adaptive_weight((a * w).sum(), (b * w).sum(), w)
    assert got.item() == pytest.approx(0.5 * a * math.sqrt(n) / (b * math.sqrt(n) + 1e-4), rel=1e-6)
    assert not got.requires_grad
    huge = loss.adaptive_weight((1e3 * w).sum(), (1e-9 * w).sum(), w)
    assert huge.item() == pytest.approx(0.5 * 1e4)
    with pytest.raises(ValueError, match="last_layer"):
        loss.adaptive_weight((a * w).sum(), (b * w).sum(), None)


def test_under_no_grad_the_gan_term_is_logged_with_zero_weight():
    loss, decoder, z, x = setup()
    with torch.no_grad():
        recon = decoder(z)
        total, logs = loss.generator_loss(x, recon, torch.tensor(0.0), step=10, last_layer=decoder.conv_out.weight)
        g = -loss.discriminator(recon).mean()
    assert logs["d_weight"].item() == 0.0
    torch.testing.assert_close(logs["g"], g)
    torch.testing.assert_close(total, logs["nll"])


def test_nll_with_learnable_logvar_closed_form_and_gradient():
    loss, decoder, z, x = setup(logvar_init=0.3, learn_logvar=True, perceptual_weight=0.0)
    assert loss.logvar.requires_grad and loss.generator_parameters() == [loss.logvar]
    recon = decoder(z).detach()
    total, logs = loss.generator_loss(x, recon, torch.tensor(0.0), step=0, last_layer=None)
    rec = (x - recon).abs()
    lv = 0.3
    expected = (rec * math.exp(-lv) + lv).sum() / 2
    torch.testing.assert_close(logs["nll"], expected)
    total.backward()
    # d/dlv Σ(rec·e^{-lv} + lv)/B = Σ(1 − rec·e^{-lv})/B
    torch.testing.assert_close(loss.logvar.grad, (1 - rec * math.exp(-lv)).sum() / 2)
    torch.testing.assert_close(logs["logvar"], torch.tensor(0.3))

    fixed, *_ = setup(logvar_init=0.3)
    assert not fixed.logvar.requires_grad and fixed.generator_parameters() == []


def test_vq_regularizer_uses_the_codebook_weight():
    loss, decoder, z, x = setup(kl_weight=1e-6, codebook_weight=0.25, perceptual_weight=0.0)
    recon = decoder(z)
    total, logs = loss.generator_loss(x, recon, torch.tensor(2.0), step=0, last_layer=None, reg_kind="vq")
    torch.testing.assert_close(total, logs["nll"] + 0.25 * x[0].numel() * 2.0)
    assert "codebook" in logs and "kl" not in logs and "lpips" not in logs
    with pytest.raises(ValueError, match="reg_kind"):
        loss.generator_loss(x, recon, torch.tensor(2.0), step=0, last_layer=None, reg_kind="l2")


def test_vq_codebook_term_has_tamings_weight_relative_to_the_reconstruction():
    # taming's VQLPIPSWithDiscriminator: mean(|x − x̂| + w_p·LPIPS) + codebook_weight · codebook_loss. Our nll sums
    # over each image's C·H·W elements, so the whole objective must be taming's times C·H·W (at logvar 0), else the
    # codebook term is C·H·W times too weak against the reconstruction (3072 at 32², 3 channels)
    loss, decoder, z, x = setup(codebook_weight=1.0, perceptual_weight=0.5)
    recon = decoder(z).detach()
    vq_loss = torch.tensor(0.37)
    terms = loss.generator_terms(x, recon, vq_loss, step=0, reg_kind="vq")
    p = 2.0 * ((x - recon) ** 2).mean(dim=(1, 2, 3), keepdim=True)  # the stand-in perceptual distance per image
    taming = ((x - recon).abs() + 0.5 * p).mean() + 1.0 * vq_loss
    c, h, w = x.shape[1:]
    torch.testing.assert_close((terms.nll + terms.reg) / (c * h * w), taming)
    torch.testing.assert_close(terms.reg / terms.nll, vq_loss / ((x - recon).abs() + 0.5 * p).mean())


def test_logs_are_detached_scalars():
    loss, decoder, z, x = setup()
    _, logs = loss.generator_loss(
        x, decoder(z), torch.tensor(0.5, requires_grad=True), step=10, last_layer=decoder.conv_out.weight
    )
    assert set(logs) == {"rec", "lpips", "nll", "kl", "g", "d_weight", "logvar", "total"}
    for key, value in logs.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, key
    torch.testing.assert_close(logs["rec"], (x - decoder(z)).abs().mean().detach())


# ---------------------------------------------------------------------------------------------------------------
# The injected perceptual net and construction
# ---------------------------------------------------------------------------------------------------------------


def test_perceptual_net_is_frozen_out_of_state_and_always_in_eval_mode():
    loss, *_ = setup()
    perceptual = loss.perceptual
    assert not perceptual.gain.requires_grad
    assert not any("perceptual" in k or "gain" in k for k in loss.state_dict())
    assert all(p is not perceptual.gain for p in loss.parameters())
    loss.train()
    assert loss.discriminator.training and not perceptual.training
    loss.to(torch.float64)
    assert perceptual.gain.dtype == torch.float64 and loss.logvar.dtype == torch.float64
    # a checkpoint of the loss loads strictly into one built without the perceptual net, and back
    bare = AutoencoderLoss(loss.config, DISC, None)
    bare.load_state_dict(loss.state_dict())


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    return use_torch_home(monkeypatch, tmp_path)


def test_missing_vgg_weights_fail_with_the_file_name_unless_allowed(empty_torch_home, caplog):
    with pytest.raises(MissingPretrainedWeights) as info:
        build_autoencoder_loss(AutoencoderLossConfig(), DISC, download=False)
    assert "vgg16-397923af.pth" in str(info.value) and str(empty_torch_home) in str(info.value)

    loss, available = build_autoencoder_loss(AutoencoderLossConfig(allow_missing_perceptual=True), DISC, download=False)
    assert available is False and loss.perceptual is None and not loss.has_perceptual
    assert "WITHOUT the LPIPS" in caplog.text and "vgg16-397923af.pth" in caplog.text
    x = torch.rand(1, 3, 32, 32)
    _, logs = loss.generator_loss(x, x.flip(-1), torch.tensor(0.0), step=0, last_layer=None)
    assert "lpips" not in logs
    torch.testing.assert_close(logs["nll"], (x - x.flip(-1)).abs().sum())


def test_zero_perceptual_weight_needs_no_weights(empty_torch_home):
    loss, available = build_autoencoder_loss(AutoencoderLossConfig(perceptual_weight=0.0), DISC, download=False)
    assert available is False and loss.perceptual is None


def test_bf16_autocast_keeps_the_loss_sums_in_fp32():
    loss, decoder, z, x = setup()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon = decoder(z)
        assert recon.dtype == torch.bfloat16
        total, logs = loss.generator_loss(x, recon, torch.tensor(0.0), step=10, last_layer=decoder.conv_out.weight)
        d_loss, d_logs = loss.discriminator_loss(x, recon, step=10)
    assert total.dtype == torch.float32 and d_loss.dtype == torch.float32
    assert all(torch.isfinite(v) for v in {**logs, **d_logs}.values())
    assert logs["d_weight"] > 0
    total.backward()
    assert torch.isfinite(decoder.conv_out.weight.grad).all()


@pytest.mark.parametrize("step", [0, 20])  # before and after disc_start (10)
@pytest.mark.parametrize("learn_logvar", [False, True])
def test_generator_backward_gives_the_gradients_of_the_literal_loss(step, learn_logvar):
    """The single-pass backward (LPIPS and D back-propagated once) equals loss.backward() of generator_loss."""
    grads = []
    for mode in ("literal", "single_pass"):
        loss_fn, decoder, z, x = setup(seed=3, learn_logvar=learn_logvar, logvar_init=0.3)
        enc = nn.Conv2d(4, 4, 1)  # something before the latent, so the regularizer has a path of its own
        zz = enc(z)
        recon = decoder(zz)
        reg = zz.pow(2).mean()
        params = [*enc.parameters(), *decoder.parameters(), *([loss_fn.logvar] if learn_logvar else [])]
        if mode == "literal":
            loss, logs = loss_fn.generator_loss(x, recon, reg, step, decoder.conv_out.weight)
            (0.5 * loss).backward()
        else:
            terms = loss_fn.generator_terms(x, recon, reg, step)
            loss, logs = loss_fn.generator_backward(terms, recon, decoder.conv_out.weight, scale=0.5)
        assert all(p.grad is None for p in loss_fn.discriminator.parameters())
        grads.append(([p.grad.clone() for p in params], loss.detach(), logs))
    (g_lit, loss_lit, logs_lit), (g_one, loss_one, logs_one) = grads
    for a, b in zip(g_lit, g_one):  # equal up to the order fp32 sums the contributions in
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
    torch.testing.assert_close(loss_lit, loss_one)
    torch.testing.assert_close(logs_lit["d_weight"], logs_one["d_weight"])
    if step >= 10:
        assert logs_one["d_weight"] > 0 and logs_one["g"] != 0


def test_generator_backward_needs_fewer_backward_passes_through_lpips_and_the_discriminator():
    """The point of the single pass: the discriminator and the perceptual net run backward once each, not twice."""
    counts = {}
    for mode in ("literal", "single_pass"):
        loss_fn, decoder, z, x = setup(seed=1)
        seen = {"disc": 0, "perceptual": 0}

        def tap(name):
            def forward_hook(module, inputs, output):
                if output.requires_grad:
                    output.register_hook(lambda grad: seen.__setitem__(name, seen[name] + 1))  # noqa: B023 (this mode's)

            return forward_hook

        last_conv = [m for m in loss_fn.discriminator.modules() if isinstance(m, nn.Conv2d)][-1]
        hooks = [
            last_conv.register_forward_hook(tap("disc")),
            loss_fn.perceptual.register_forward_hook(tap("perceptual")),
        ]
        recon = decoder(z)
        if mode == "literal":
            loss_fn.generator_loss(x, recon, torch.zeros(()), 20, decoder.conv_out.weight)[0].backward()
        else:
            loss_fn.generator_backward(
                loss_fn.generator_terms(x, recon, torch.zeros(()), 20), recon, decoder.conv_out.weight
            )
        for h in hooks:
            h.remove()
        counts[mode] = dict(seen)
    assert counts == {"literal": {"disc": 2, "perceptual": 2}, "single_pass": {"disc": 1, "perceptual": 1}}
