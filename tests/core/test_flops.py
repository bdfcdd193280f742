import pytest
import torch

from ldm_core.flops import count_flops, measure_matmul_peak, mfu


def test_counts_a_linear_layer_forward_and_backward_exactly():
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    assert count_flops(lambda: lin(x)) == 2 * 8 * 64 * 32
    # backward: grad wrt input and wrt weight, each another matmul of the same size
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 8 * 64 * 32


def test_counts_a_convolution():
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 16, 16)
    assert count_flops(lambda: conv(x)) == 2 * 2 * 16 * 16 * 8 * 4 * 9


def test_matmul_peak_is_a_plausible_rate():
    rate = measure_matmul_peak(torch.float32, n=256, seconds=0.05)
    assert 1e8 < rate < 1e15


def test_the_peak_is_the_faster_of_the_matmul_and_the_convolution(monkeypatch):
    """On a CPU whose BLAS matmul is slower than oneDNN's convolutions, a matmul-only peak puts conv-heavy steps
    above 100% MFU: the peak takes the faster kernel."""
    import ldm_core.flops as flops

    calls = []

    def fake_rate(fn, n_flops, seconds, device):
        calls.append(n_flops)
        return 200e9 if len(calls) == 1 else 300e9  # the matmul first, then the convolution

    monkeypatch.setattr(flops, "_rate", fake_rate)
    assert flops.measure_matmul_peak(torch.float32, n=64, seconds=0.0) == 300e9
    assert calls == [2.0 * 64**3, 2.0 * 8 * 8 * 8 * 9 * 32 * 32]  # each kernel's own FLOPs


def test_mfu_formula():
    assert mfu(2e9, 50.0, 200e9) == pytest.approx(0.5)
    assert mfu(2e9, 50.0, None) is None


def test_step_flops_are_counted_on_meta_tensors_and_match_a_real_count():
    from ldm_core.flops import denoiser_step_flops
    from ldm_core.models.unet import UNET_PRESETS, UNet

    meta = denoiser_step_flops(UNET_PRESETS["tiny"], (4, 8, 8), (16, 384), batch=2)
    model = UNet(UNET_PRESETS["tiny"])
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.rand(2) * 1000, torch.randn(2, 16, 384)
    mask = torch.ones(2, 16, dtype=torch.bool)
    real = count_flops(lambda: model(x, t, ctx, mask).float().pow(2).mean().backward()) / 2
    # convolutions and matmuls count identically; attention's backward is counted per kernel, and the meta device
    # picks the math kernel where the CPU picks the flash one: within a few percent
    assert real > 0 and abs(meta - real) / real < 0.03


def test_autoencoder_step_flops_grow_with_the_gan_and_the_perceptual_net():
    from ldm_core.flops import autoencoder_step_flops
    from ldm_core.trainers.autoencoder import AutoencoderTrainingConfig

    cfg = AutoencoderTrainingConfig.model_validate(
        {"model": {"preset": "tiny"}, "discriminator": {"ndf": 16, "n_layers": 2}}
    )
    plain = autoencoder_step_flops(cfg, 32, perceptual=False)
    assert plain["g_gan"] > plain["g"] > 0 and plain["d"] > 0
    with_lpips = autoencoder_step_flops(cfg, 32, perceptual=True)
    assert with_lpips["g"] > 2 * plain["g"]  # VGG16 forward + backward dwarfs the tiny autoencoder
