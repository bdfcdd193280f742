"""Stage 1: train the autoencoder with the VQGAN recipe (L1 + LPIPS + PatchGAN + a tiny KL), resumably.

``train_autoencoder(config, data, tracker)`` runs the generator step (autoencoder) and, once the discriminator has
started, the discriminator step, every optimizer step; it checkpoints every N steps and, when pointed at a
directory that already holds a checkpoint, resumes from it exactly (bit for bit on CPU).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ldm_core.checkpoint import CheckpointManager
from ldm_core.config import StrictModel, flatten_dict
from ldm_core.grids import reconstruction_grid
from ldm_core.losses.autoencoder import AutoencoderLoss, AutoencoderLossConfig, build_autoencoder_loss
from ldm_core.models.autoencoder import AutoencoderConfig, build_autoencoder
from ldm_core.models.discriminator import DiscriminatorConfig
from ldm_core.tracking import NullTracker, Tracker
from ldm_core.trainers.common import (
    EMA,
    BatchStream,
    DataPosition,
    EpochBatchSampler,
    MetricWindow,
    NonFiniteGuard,
    RunState,
    autocast,
    grad_norm_and_finite,
    make_adam,
    resolve_device,
    resolve_precision,
    seed_everything,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


class AutoencoderTrainerConfig(StrictModel):
    steps: int = 1000
    """Optimizer steps to train for (total, across resumes)."""
    batch_size: int = 8
    """Global batch per optimizer step: micro_batch_size × grad_accum × world size."""
    micro_batch_size: int | None = None
    """Images per forward pass on one process; None = the whole per-process batch (no accumulation)."""
    lr: float = 4.5e-6
    """Autoencoder learning rate (LDM: 4.5e-6 × batch size on its first-stage runs)."""
    disc_lr: float | None = None
    """Discriminator learning rate; None = lr."""
    betas: tuple[float, float] = (0.5, 0.9)
    """Adam betas for both optimizers, as in VQGAN/LDM (a low β1 steadies the adversarial game)."""
    grad_clip: float | None = 1.0
    """Max global gradient norm per optimizer; None disables clipping."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision of the forward pass; "auto" = bf16 where the device has it."""
    device: str = "auto"
    """"auto" (CUDA if present, else CPU), or any torch device string."""
    ema_decay: float | None = None
    """Keep an EMA of the autoencoder's weights (and export it) when set, e.g. 0.999."""
    checkpoint_every: int = 500
    """Write a resumable checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep; older ones are pruned after a newer one is committed."""
    max_nonfinite_steps: int = 10
    """Skip steps with a NaN/inf loss or gradient; stop the run once more than this many were skipped."""
    log_every: int = 10
    """Send step metrics to the tracker every N steps."""
    image_every: int = 0
    """Send a reconstruction grid to the tracker every N steps (0 = only at the end)."""
    seed: int = 0
    """Seeds the data order, the posterior samples and every other random draw."""
    num_workers: int = 0
    """DataLoader worker processes that decode ahead of the step (0 = load in the training process)."""
    sample_posterior: bool = True
    """Decode a posterior sample (as LDM) rather than its mean while training."""
    channels_last: bool = False
    """Run convolutions in channels_last memory format (often faster on GPU and oneDNN CPUs)."""

    @model_validator(mode="after")
    def _check(self) -> "AutoencoderTrainerConfig":
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        return self


class AutoencoderTrainingConfig(StrictModel):
    """Everything stage 1 needs: the model, the discriminator, the loss and the trainer."""

    model: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    loss: AutoencoderLossConfig = Field(default_factory=AutoencoderLossConfig)
    trainer: AutoencoderTrainerConfig = Field(default_factory=AutoencoderTrainerConfig)


# ---------------------------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class AutoencoderTrainResult:
    model: nn.Module
    """The trained autoencoder on CPU in eval mode (the EMA weights when ema_decay is set)."""
    step: int
    """Steps completed."""
    perceptual_used: bool
    nonfinite_skipped: int
    resumed_from: int | None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Step metrics as logged (also sent to the tracker)."""
    images_per_second: float = 0.0
    finished: bool = True
    """False when ``should_stop`` ended the run early (resume later from the checkpoint)."""


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------


def _to_images(batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def train_autoencoder(
    config: AutoencoderTrainingConfig,
    data: torch.utils.data.Dataset,
    tracker: Tracker | None = None,
    checkpoint_dir: str | None = None,
    *,
    perceptual: nn.Module | None | Literal["auto"] = "auto",
    should_stop: Callable[[int], bool] | None = None,
    rank: int = 0,
    world_size: int = 1,
    storage_options: dict[str, Any] | None = None,
) -> AutoencoderTrainResult:
    """Train (or resume training) the autoencoder on ``data`` (items or ``get_batch`` → (B,3,H,W) in [−1, 1]).

    perceptual: "auto" builds LPIPS from the pretrained VGG (failing with the file it needs, unless the loss config
    allows training without it); a module or None injects one (tests).
    should_stop(step): checked after each step; True ends the run early, after a checkpoint (resume later).
    """
    tracker = tracker or NullTracker()
    tc = config.trainer
    device = resolve_device(tc.device)
    precision = resolve_precision(tc.precision, device)
    per_rank = tc.batch_size // world_size
    micro = tc.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"per-process batch {per_rank} is not a multiple of micro_batch_size {micro}")
    accum = per_rank // micro

    gen = seed_everything(tc.seed + rank, device)
    model = build_autoencoder(config.model).to(device)
    if perceptual == "auto":
        loss_fn, perceptual_used = build_autoencoder_loss(config.loss, config.discriminator)
    else:
        loss_fn, perceptual_used = AutoencoderLoss(config.loss, config.discriminator, perceptual), perceptual is not None
    loss_fn = loss_fn.to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
        loss_fn = loss_fn.to(memory_format=torch.channels_last)
    ema = EMA(model, tc.ema_decay) if tc.ema_decay else None

    g_params = list(model.parameters()) + ([loss_fn.logvar] if loss_fn.logvar.requires_grad else [])
    d_params = list(loss_fn.discriminator.parameters())
    opt_g = make_adam(g_params, device, lr=tc.lr, betas=tc.betas)
    opt_d = make_adam(d_params, device, lr=tc.disc_lr or tc.lr, betas=tc.betas)

    sampler = EpochBatchSampler(len(data), micro * world_size, seed=tc.seed, rank=rank, world_size=world_size)
    ckpt = CheckpointManager(checkpoint_dir, keep=tc.keep_checkpoints, storage_options=storage_options) if checkpoint_dir else None
    guard = NonFiniteGuard(tc.max_nonfinite_steps)
    parts: dict[str, Any] = {"model": model, "loss": loss_fn, "opt_g": opt_g, "opt_d": opt_d}
    if ema is not None:
        parts["ema"] = ema
    run_state = RunState(config.to_dict(), "model", parts, gen, guard)

    # ---- resume -------------------------------------------------------------------------------------------------
    start_step, position, resumed_from = 0, DataPosition(), None
    if ckpt is not None and (latest := ckpt.load_latest()) is not None:
        resumed_from, state = latest
        start_step, position = run_state.restore(state, checkpoint_dir)
        log.info("resumed autoencoder training from step %d (%s)", start_step, checkpoint_dir)

    stream = BatchStream(data, sampler, position, num_workers=tc.num_workers)

    def save(step: int) -> None:
        if ckpt is not None and rank == 0:
            ckpt.save(step, run_state.snapshot(step, stream.position))

    if rank == 0:  # every run reports its config, a resumed one too (trackers open a new run per attempt)
        tracker.log_params({**flatten_dict(config.to_dict()), "perceptual_used": perceptual_used,
                            "device": str(device), "precision": precision, "world_size": world_size,
                            "resumed_from_step": resumed_from or 0})
        tracker.set_tags({"perceptual_used": str(perceptual_used).lower()})
        if not perceptual_used:
            log.warning("training the autoencoder WITHOUT the LPIPS perceptual term (VGG weights unavailable, "
                        "allowed by loss.allow_missing_perceptual)")

    window = MetricWindow()
    t0, images_seen = time.perf_counter(), 0
    last_images: tuple[torch.Tensor, torch.Tensor] | None = None
    model.train()
    loss_fn.train()
    step = start_step
    finished = True
    while step < tc.steps:
        disc_on = loss_fn.disc_active(step)
        # ---- 1) generator (autoencoder) step, accumulated over micro-batches --------------------------------------
        opt_g.zero_grad(set_to_none=True)
        micro_batches, logs_acc = [], {}
        for _ in range(accum):
            x = _to_images(stream.next()).to(device, non_blocking=True)
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                out = model(x, sample_posterior=tc.sample_posterior, generator=gen)
                loss, logs = loss_fn.generator_loss(x, out.reconstruction, out.reg_loss, step, model.last_layer,
                                                    reg_kind=out.reg_kind)
            (loss / accum).backward()
            micro_batches.append((x, out.reconstruction.detach()))
            for k, v in {**logs, **out.stats}.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + v.detach().float() / accum
        gnorm = grad_norm_and_finite(g_params, tc.grad_clip)
        ok = guard.check(logs_acc["total"], gnorm)
        if ok:
            opt_g.step()
            if ema is not None:
                ema.update(model)
        else:
            log.warning("step %d: non-finite autoencoder loss/gradient; step skipped (%d so far)", step, guard.skipped)
        # ---- 2) discriminator step, on the same images and their (detached) reconstructions ----------------------
        if disc_on and ok:
            opt_d.zero_grad(set_to_none=True)
            for x, recon in micro_batches:
                with autocast(device, precision):
                    d_loss, d_logs = loss_fn.discriminator_loss(x, recon, step)
                (d_loss / accum).backward()
                for k, v in d_logs.items():
                    logs_acc[k] = logs_acc.get(k, 0.0) + v.detach().float() / accum
            d_norm = grad_norm_and_finite(d_params, tc.grad_clip)
            if guard.check(d_norm):
                opt_d.step()
        last_images = micro_batches[-1]
        step += 1
        images_seen += tc.batch_size

        # ---- 3) logging, images, checkpoints ----------------------------------------------------------------------
        logs_acc["grad_norm"] = gnorm
        window.add(logs_acc)
        if rank == 0 and (step % tc.log_every == 0 or step == tc.steps):
            tracker.log_metrics(window.flush(
                step, nonfinite_skipped=float(guard.skipped),
                images_per_second=images_seen / max(time.perf_counter() - t0, 1e-9)), step)
        if rank == 0 and tc.image_every and step % tc.image_every == 0 and last_images is not None:
            tracker.log_image(reconstruction_grid(*last_images), "reconstructions", step)
        stop_now = should_stop is not None and should_stop(step)
        if step % tc.checkpoint_every == 0 or step == tc.steps or stop_now:
            save(step)
        if stop_now and step < tc.steps:
            finished = False
            break

    elapsed = time.perf_counter() - t0
    if rank == 0 and last_images is not None and finished:
        tracker.log_image(reconstruction_grid(*last_images), "reconstructions", step)
    final = (ema.model if ema is not None else model).eval()
    final = final.to(memory_format=torch.contiguous_format).cpu()
    return AutoencoderTrainResult(
        model=final, step=step, perceptual_used=perceptual_used, nonfinite_skipped=guard.skipped,
        resumed_from=resumed_from, history=window.history,
        images_per_second=images_seen / max(elapsed, 1e-9), finished=finished,
    )


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def measure_latent_scale(model: nn.Module, data: torch.utils.data.Dataset, max_items: int = 1024,
                         batch_size: int = 32, use_shift: bool = False, seed: int = 0,
                         device: str | torch.device = "cpu") -> tuple[float, float]:
    """Encode a sample of the data and return (scale, shift): latents (z − shift)·scale have unit std.

    scale = 1/std(z) over all elements, z a posterior sample (as SD-1 measured its 0.18215); shift is the mean when
    ``use_shift`` (as SD3), else 0.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    n = min(len(data), max_items)
    total, total_sq, count = 0.0, 0.0, 0
    fetch = getattr(data, "get_batch", None)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        x = fetch(idx) if fetch else torch.stack([_to_images(data[i]) for i in idx])
        x = _to_images(x).to(device)
        if model.config.kind == "kl":
            z = model.encode(x).sample(gen)
        else:
            z, _, _ = model.quantize(model.encode_pre_quant(x))
        z = z.double()
        total += z.sum().item()
        total_sq += z.pow(2).sum().item()
        count += z.numel()
    mean = total / count
    std = max(total_sq / count - mean**2, 0.0) ** 0.5
    if std == 0.0:
        raise ValueError("latents have zero variance: cannot measure a latent scale (is the autoencoder trained?)")
    shift = mean if use_shift else 0.0
    return 1.0 / std, shift


@torch.inference_mode()
def reconstruction_psnr(model: nn.Module, data: torch.utils.data.Dataset, max_items: int = 64,
                        batch_size: int = 32, device: str | torch.device = "cpu") -> float:
    """Mean PSNR (dB, images in [0, 1]) of posterior-mean reconstructions over the first ``max_items`` items."""
    device = torch.device(device)
    model = model.to(device).eval()
    n = min(len(data), max_items)
    fetch = getattr(data, "get_batch", None)
    values = []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        x = _to_images(fetch(idx) if fetch else torch.stack([_to_images(data[i]) for i in idx])).to(device)
        recon = model.decode_latents(model.encode_latents(x)).clamp(-1, 1)
        mse = ((recon - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)  # on [0, 1] images
        values.append(10 * torch.log10(1.0 / mse))
    if not values:
        raise ValueError("no images to measure reconstruction PSNR on")
    return float(torch.cat(values).mean())
