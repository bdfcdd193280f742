"""Model FLOPs and MFU: how much of the hardware's arithmetic a training step actually uses.

FLOPs are counted, not estimated: `count_flops` runs a step under ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions and attention, forward and backward). MFU = achieved FLOP/s ÷ the device's peak. On CPU
the peak is the dense matmul rate measured on this machine (`measure_matmul_peak`), in the precision the step runs
in; on a GPU it is the datasheet's dense rate for the precision (`gpu_peak_flops`), unless given explicitly.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) peak FLOP/s per GPU model, by precision (datasheet figures; SXM parts).
_GPU_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "tf32": 156e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30e12, "tf32": 60e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 31e12, "tf32": 62e12},
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs executed by ``fn()`` (run it once: forward, and backward if it calls it)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0, device: str | torch.device = "cpu"
) -> float:
    """This device's practical dense peak in ``dtype``, what MFU is relative to: the faster of an n×n matmul and a
    3×3 convolution (64→64 → n/8 channels at 32×32). Both: on some CPUs the BLAS a matmul calls is slower than the
    oneDNN kernels a convolution runs (on an AMD EPYC a matmul-only peak put a conv-heavy step at 106% "MFU")."""
    device = torch.device(device)
    # a private generator: trainers measure this mid-run, and a draw from the global RNG would make a resumed run's
    # RNG state (and anything drawn from it, e.g. dropout) differ from an uninterrupted one's
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    c = max(8, n // 8)
    x = torch.randn(8, c, 32, 32, device=device, generator=g).to(dtype)
    w = torch.randn(c, c, 3, 3, device=device, generator=g).to(dtype)
    matmul = _rate(lambda: a @ b, 2.0 * n**3, seconds / 2, device)
    conv = _rate(
        lambda: torch.nn.functional.conv2d(x, w, padding=1), 2.0 * 8 * c * c * 9 * 32 * 32, seconds / 2, device
    )
    return max(matmul, conv)


def _rate(fn: Callable[[], object], flops: float, seconds: float, device: torch.device) -> float:
    """FLOP/s of ``fn`` (``flops`` per call), timed for at least ``seconds`` and 3 calls after 2 warm-up calls."""
    for _ in range(2):  # warm up kernels and caches
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    iters, start = 0, time.perf_counter()
    while True:
        fn()
        iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and iters >= 3:
            return flops * iters / elapsed


def gpu_peak_flops(precision: str, device: torch.device | None = None) -> float | None:
    """Datasheet dense peak of the current GPU for a precision ("bf16", "fp16", "fp32"); None if unknown."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for model, peaks in _GPU_PEAKS.items():
        if model in name:
            return peaks.get(precision)
    return None


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The peak that MFU is relative to: datasheet on known GPUs, measured matmul rate on CPU."""
    if device.type == "cuda":
        return gpu_peak_flops(precision, device)
    if device.type == "cpu":
        return measure_matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
    return None


def mfu(flops_per_sample: float, samples_per_second: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s ÷ peak FLOP/s."""
    if not peak or flops_per_sample <= 0:
        return None
    return flops_per_sample * samples_per_second / peak


# ---------------------------------------------------------------------------------------------------------------
# Training-step FLOPs of the two stages, counted on the meta device (no memory, no compute, no side effects)
# ---------------------------------------------------------------------------------------------------------------


def denoiser_step_flops(
    denoiser_config: object, latent_shape: tuple[int, ...], context_shape: tuple[int, int], batch: int = 2
) -> float:
    """Forward + backward FLOPs per sample of the denoiser at these shapes (C, h, w) and (L, D), with the pooled
    text vector where the backbone takes one (as the trainer passes it)."""
    from ldm_core.models.denoiser import build_denoiser, takes_pooled

    with torch.device("meta"):
        model = build_denoiser(denoiser_config)
        x = torch.empty(batch, *latent_shape)
        t = torch.empty(batch)
        ctx = torch.empty(batch, *context_shape)
        mask = torch.ones(batch, context_shape[0], dtype=torch.bool)
        pooled = torch.empty(batch, denoiser_config.pooled_dim) if takes_pooled(denoiser_config) else None
    return count_flops(lambda: model(x, t, ctx, mask, pooled=pooled).float().pow(2).mean().backward()) / batch


def autoencoder_step_flops(
    training_config: object, image_size: int, perceptual: bool, batch: int = 2
) -> dict[str, float]:
    """Per-image FLOPs of the autoencoder's training passes: ``g`` (generator step before the discriminator starts),
    ``g_gan`` (after: the discriminator's forward and backward and the adaptive weight), ``d`` (discriminator step).
    Counted on meta tensors with the trainer's own code paths (`AutoencoderLoss.generator_backward`)."""
    from ldm_core.losses.autoencoder import AutoencoderLoss
    from ldm_core.models.autoencoder import build_autoencoder

    cfg = training_config
    with torch.device("meta"):
        model = build_autoencoder(cfg.model)
        net = None
        if perceptual:
            import lpips

            # (its scaling constants are made with torch.Tensor(...), which ignores the device context: move them)
            net = (
                lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
                .eval()
                .requires_grad_(False)
                .to("meta")
            )
        # FLOPs do not depend on the normalization; GroupNorm has no data-dependent init to run on meta tensors
        disc_cfg = cfg.discriminator.model_copy(update={"norm": "group"})
        loss = AutoencoderLoss(cfg.loss.model_copy(update={"disc_start": 1}), disc_cfg, net)
        x = torch.empty(batch, cfg.model.in_channels, image_size, image_size)
    out: dict[str, float] = {}
    for kind, step in (("g", 0), ("g_gan", 1)):

        def g_pass(step: int = step) -> None:
            o = model(x, sample_posterior=False)
            terms = loss.generator_terms(x, o.reconstruction, o.reg_loss, step, reg_kind=o.reg_kind)
            loss.generator_backward(terms, o.reconstruction, model.last_layer)

        out[kind] = count_flops(g_pass) / batch
    with torch.device("meta"):
        recon = torch.empty_like(x)
    out["d"] = count_flops(lambda: loss.discriminator_loss(x, recon, 1)[0].backward()) / batch
    return out
