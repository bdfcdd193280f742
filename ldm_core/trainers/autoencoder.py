"""Stage 1: train the autoencoder with the VQGAN recipe (L1 + LPIPS + PatchGAN + a tiny KL), resumably.

``train_autoencoder(config, data, tracker)`` runs the generator step (autoencoder) and, once the discriminator has
started, the discriminator step, every optimizer step; it checkpoints every N steps and, when pointed at a
directory that already holds a checkpoint, resumes from it exactly (bit for bit on CPU).

Under torchrun (see `ldm_core.distributed`) the autoencoder and the discriminator are each wrapped in
DistributedDataParallel, every rank trains on its rows of each global batch, and N processes take the same steps as
one process with the same global batch: posterior noise is drawn for the global batch, the adaptive GAN weight and
ActNorm's init see the global batch, and BatchNorm becomes SyncBatchNorm (GPUs). Rank 0 alone tracks and checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ldm_core import distributed
from ldm_core.config import StrictModel
from ldm_core.distributed import BatchShard
from ldm_core.flops import autoencoder_step_flops
from ldm_core.grids import reconstruction_grid
from ldm_core.losses.autoencoder import AutoencoderLoss, AutoencoderLossConfig, GeneratorTerms, build_autoencoder_loss
from ldm_core.models.autoencoder import AutoencoderConfig, AutoencoderOutput, build_autoencoder
from ldm_core.models.discriminator import ActNorm, DiscriminatorConfig
from ldm_core.tracking import NullTracker, Tracker
from ldm_core.trainers.config import TrainerConfig
from ldm_core.trainers.loop import StepOutput, TrainingLoop
from ldm_core.trainers.meters import ThroughputMeter
from ldm_core.trainers.run_setup import RunSetup, autocast, checkpointed_parts, start_run
from ldm_core.trainers.step import EMA, LossScaler, grad_norm_and_finite, lr_at, make_adam, optimizer_step, set_lr
from ldm_core.trainers.warm_start import load_init_weights

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


class AutoencoderTrainerConfig(TrainerConfig):
    """The stage-1 trainer: the shared fields (`TrainerConfig`) plus two Adam optimizers and the autoencoder's
    own options."""

    lr: float = Field(4.5e-6, gt=0)
    """Autoencoder learning rate (LDM: 4.5e-6 × batch size on its first-stage runs)."""
    grad_clip: float | None = Field(None, gt=0)
    """Max global gradient norm per optimizer; None, deliberately, does not clip (CompVis' first-stage trainer does
    not). The nll is summed over pixels and averaged over images, so its gradient norm grows with the image size
    and sits far above 1: the shared default of 1.0 would clip nearly every step, and with Adam, which divides out
    a gradient's scale, that would change nothing but the relative weight of the steps. Set it to guard against
    rare spikes, at a norm well above the typical ``grad_norm`` the tracker shows."""
    disc_lr: float | None = Field(None, gt=0)
    """Discriminator learning rate; None = lr."""
    betas: tuple[float, float] = (0.5, 0.9)
    """Adam betas for both optimizers, as in VQGAN/LDM (a low β1 steadies the adversarial game)."""
    ema_decay: float | None = Field(None, ge=0, lt=1)
    """Keep an EMA of the autoencoder's weights (and export it) when set, e.g. 0.999."""
    image_every: int = Field(0, ge=0)
    """Send a reconstruction grid to the tracker every N steps (0 = only at the end)."""
    sample_posterior: bool = True
    """Decode a posterior sample (as LDM) rather than its mean while training."""
    trainable: Literal["all", "decoder"] = "all"
    """What the generator step trains: the whole autoencoder, or only its decoder side (``post_quant_conv`` and the
    decoder) while the encoder and ``quant_conv``, and so the latent space, stay bitwise fixed: how SD's ft-MSE and
    ft-EMA decoders were fine-tuned from kl-f8, so latents (and any denoiser trained on them) stay valid."""


class AutoencoderTrainingConfig(StrictModel):
    """Everything stage 1 needs: the model, the discriminator, the loss and the trainer."""

    model: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    loss: AutoencoderLossConfig = Field(default_factory=AutoencoderLossConfig)
    trainer: AutoencoderTrainerConfig = Field(default_factory=AutoencoderTrainerConfig)

    @model_validator(mode="after")
    def _check_trainable(self) -> AutoencoderTrainingConfig:
        if self.trainer.trainable == "decoder" and self.model.kind != "kl":
            raise ValueError(
                f"trainer.trainable 'decoder' keeps a KL autoencoder's latent space fixed; model.kind is "
                f"{self.model.kind!r}"
            )
        return self


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


class GeneratorStep(nn.Module):
    """One micro-batch of the autoencoder's objective (forward + loss): the module DistributedDataParallel wraps.

    Its parameters are the autoencoder's and the loss's logvar (DDP ignores it unless it is learned): exactly what
    the generator's backward reaches. The loss module, with the discriminator, is kept out of the module registry:
    the discriminator takes no gradient here and has its own wrapper (`DiscriminatorStep`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: AutoencoderLoss,
        generator: torch.Generator,
        shard: BatchShard,
        sample_posterior: bool,
    ):
        super().__init__()
        self.model = model
        self.logvar = loss_fn.logvar
        self._loss = [loss_fn]  # a plain list: not a submodule
        self.generator, self.shard, self.sample_posterior = generator, shard, sample_posterior
        # the adaptive GAN weight compares gradient norms: averaged over ranks first, they are the global batch's
        self.grad_mean = distributed.all_reduce_mean if shard.world_size > 1 else None

    def forward(self, x: torch.Tensor, step: int) -> tuple[AutoencoderOutput, GeneratorTerms]:
        out = self._autoencode(x)
        return out, self._loss[0].generator_terms(x, out.reconstruction, out.reg_loss, step, reg_kind=out.reg_kind)

    def backward(
        self, out: AutoencoderOutput, terms: GeneratorTerms, scale: float, loss_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss's gradients, LPIPS and the discriminator back-propagated once
        (`AutoencoderLoss.generator_backward`)."""
        return self._loss[0].generator_backward(
            terms,
            out.reconstruction,
            self.model.last_layer,
            grad_mean=self.grad_mean,
            scale=scale,
            loss_scale=loss_scale,
        )

    def _autoencode(self, x: torch.Tensor) -> AutoencoderOutput:
        model = self.model
        if self.shard.world_size == 1 or not self.sample_posterior or model.config.kind != "kl":
            return model(x, sample_posterior=self.sample_posterior, generator=self.generator)
        # AutoencoderKL.forward with the posterior noise drawn for the global batch, of which this rank keeps its rows
        # (the DDP tests hold this equal to the single-process forward above)
        posterior = model.encode(x)
        mean = posterior.mean  # (b, z, h, w)
        eps = self.shard.randn(mean.shape, self.generator, device=mean.device, dtype=mean.dtype)  # (b, z, h, w)
        recon = model.decode(mean + posterior.std * eps)  # (b, 3, H, W)
        return AutoencoderOutput(recon, posterior.kl().mean(), "kl", posterior)


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(module, "module", module)


class DiscriminatorStep(nn.Module):
    """The discriminator's loss on one micro-batch: the module DistributedDataParallel wraps for the D step."""

    def __init__(self, loss_fn: AutoencoderLoss):
        super().__init__()
        self.discriminator = loss_fn.discriminator
        self._loss = [loss_fn]

    def forward(self, x: torch.Tensor, recon: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._loss[0].discriminator_loss(x, recon, step)


def init_actnorm_from_global_batch(module: nn.Module) -> None:
    """Make every not-yet-initialized ActNorm in ``module`` initialize from the global batch when distributed.

    ActNorm sets its scale and offset from the statistics of its first training batch; each rank sees only its rows,
    so the activations are gathered from all ranks (in global order) first, and every rank computes the init one
    process with the whole batch would. The hook removes itself once it has run.
    """
    if not distributed.is_distributed():
        return
    for m in module.modules():
        if isinstance(m, ActNorm) and not bool(m.initialized):
            _register_global_init(m)


def _register_global_init(actnorm: ActNorm) -> None:
    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if mod.training:
            mod.initialize(distributed.gather_global_batch(args[0].detach().float()))  # (B·world, C, H, W)
            handle.remove()

    handle = actnorm.register_forward_pre_hook(hook)


ENCODER_SIDE = ("encoder", "quant_conv")
"""The modules that map images to the posterior: what ``trainable: decoder`` keeps fixed."""


def freeze_for(model: nn.Module, trainable: str) -> list[nn.Parameter]:
    """Freeze what ``trainable`` leaves fixed (for "decoder": `ENCODER_SIDE`) and return the parameters to train.
    A frozen parameter gets no gradient, so the optimizer, the EMA's lerp and the DDP all-reduce leave it unchanged."""
    if trainable == "decoder":
        for name in ENCODER_SIDE:
            if (module := getattr(model, name, None)) is not None:
                module.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def _to_images(batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


@dataclass
class _AutoencoderParts:
    """What the stage-1 trainer trains and steps with, built in the order that fixes its initial weights."""

    model: nn.Module
    loss_fn: AutoencoderLoss
    perceptual_used: bool
    ema: EMA | None
    g_params: list[nn.Parameter]
    d_params: list[nn.Parameter]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: LossScaler
    scaler_d: LossScaler

    def checkpointed(self) -> dict[str, Any]:
        trained = {"model": self.model, "loss": self.loss_fn, "opt_g": self.opt_g, "opt_d": self.opt_d}
        return checkpointed_parts(trained, self.ema, {"scaler_g": self.scaler_g, "scaler_d": self.scaler_d})


def _build_autoencoder_parts(
    config: AutoencoderTrainingConfig,
    run: RunSetup,
    perceptual: nn.Module | None | Literal["auto"],
    init_weights: dict[str, torch.Tensor] | None,
) -> _AutoencoderParts:
    """The autoencoder, its loss (with the discriminator), the EMA, both optimizers and their loss scales, on the
    run's device. The seeded generator draws the autoencoder's initial weights first, then the discriminator's."""
    tc, device = config.trainer, run.device
    model = build_autoencoder(config.model)
    if init_weights is not None:
        load_init_weights(model, init_weights, "autoencoder")
    model = model.to(device)
    if perceptual == "auto":
        loss_fn, perceptual_used = build_autoencoder_loss(config.loss, config.discriminator)
    else:
        loss_fn, perceptual_used = (
            AutoencoderLoss(config.loss, config.discriminator, perceptual),
            perceptual is not None,
        )
    loss_fn = loss_fn.to(device)
    loss_fn.discriminator = distributed.convert_batchnorm(loss_fn.discriminator, device)  # SyncBatchNorm under DDP
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
        loss_fn = loss_fn.to(memory_format=torch.channels_last)
    ema = EMA(model, tc.ema_decay) if tc.ema_decay else None

    g_params = freeze_for(model, tc.trainable) + loss_fn.generator_parameters()  # logvar when it is learned
    d_params = list(loss_fn.discriminator.parameters())
    opt_g = make_adam(g_params, device, lr=tc.lr, betas=tc.betas)
    opt_d = make_adam(d_params, device, lr=tc.disc_lr or tc.lr, betas=tc.betas)
    # one loss scale per optimizer: the generator's summed nll and the discriminator's mean hinge differ in scale
    scaler_g, scaler_d = LossScaler(run.precision, device), LossScaler(run.precision, device)
    return _AutoencoderParts(model, loss_fn, perceptual_used, ema, g_params, d_params, opt_g, opt_d, scaler_g, scaler_d)


class _AutoencoderStep:
    """One optimizer step of stage 1: the generator (autoencoder) step, then, once the discriminator has started,
    the discriminator step on the same images. It keeps the last micro-batch and its reconstruction for the
    tracker's images, and the images' size for the FLOPs count."""

    def __init__(self, config: AutoencoderTrainingConfig, run: RunSetup, parts: _AutoencoderParts, loop: TrainingLoop):
        self.tc, self.run, self.parts, self.loop = config.trainer, run, parts, loop
        # DDP after the resume (its construction broadcasts rank 0's state; every rank has loaded the same checkpoint)
        init_actnorm_from_global_batch(parts.loss_fn.discriminator)
        # compiled or not, the same parameters: the EMA and the checkpoints use the plain module
        step_model = torch.compile(parts.model) if self.tc.compile else parts.model
        self.gen_step = distributed.wrap_ddp(
            GeneratorStep(step_model, parts.loss_fn, run.gen, run.shard, self.tc.sample_posterior), run.device
        )
        # buffers (SyncBatchNorm's statistics, ActNorm's flag) are equal on every rank by construction: none to sync
        self.disc_step = distributed.wrap_ddp(DiscriminatorStep(parts.loss_fn), run.device, sync_buffers=False)
        self.image_size = config.model.resolution  # replaced by the batches' own size
        self.last_images: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, step: int) -> StepOutput:
        tc, parts = self.tc, self.parts
        disc_on = parts.loss_fn.disc_active(step)
        factor = lr_at(step, 1.0, tc.warmup_steps, tc.steps, tc.lr_schedule, tc.min_lr_ratio)
        set_lr(parts.opt_g, tc.lr * factor)
        set_lr(parts.opt_d, (tc.disc_lr or tc.lr) * factor)
        micro_batches, logs, found_inf, counted = self._generator_step(step)
        if disc_on:
            counted = self._discriminator_step(step, micro_batches, logs, found_inf, counted)
        self.loop.guard.record(counted)
        self.last_images = micro_batches[-1]
        return StepOutput(logs, flops=["g_gan", "d"] if disc_on else ["g"])

    def _generator_step(
        self, step: int
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The autoencoder's step, accumulated over micro-batches: returns the micro-batches with their (detached)
        reconstructions, the step's logs, and whether it was skipped (device flags, no host sync)."""
        tc, run, parts = self.tc, self.run, self.parts
        accum, device, precision = run.accum, run.device, run.precision
        parts.opt_g.zero_grad(set_to_none=True)
        micro_batches, logs_acc = [], {}
        for i in range(accum):
            x = _to_images(self.loop.stream.next()).to(device, non_blocking=True)  # (b, 3, H, W): this rank's rows
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with distributed.no_sync_unless(self.gen_step, sync=i == accum - 1):  # all-reduce once, after the last
                with autocast(device, precision):
                    out, terms = self.gen_step(x, step)
                loss, logs = _unwrap(self.gen_step).backward(out, terms, 1.0 / accum, loss_scale=parts.scaler_g.scale())
            self.image_size = x.shape[-1]
            micro_batches.append((x, out.reconstruction.detach()))
            for k, v in {**logs, **out.stats}.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + v.detach().float() / accum
        parts.scaler_g.unscale(parts.opt_g)
        gnorm = grad_norm_and_finite(parts.g_params, tc.grad_clip)
        # device-side: skipped by the fused optimizer, no host sync. The loss's terms, not the total: the total holds
        # the adaptive weight, a ratio of (scaled) gradients that is NaN when they overflow, a gradient matter
        terms_acc = [logs_acc[k] for k in ("nll", "kl", "codebook", "g") if k in logs_acc]
        found_inf, counted = parts.scaler_g.nonfinite(gnorm, *terms_acc)
        optimizer_step(parts.opt_g, found_inf)
        parts.scaler_g.update()
        if parts.ema is not None:
            parts.ema.update(parts.model, skip=found_inf)
        logs_acc["grad_norm"] = gnorm
        return micro_batches, logs_acc, found_inf, counted

    def _discriminator_step(
        self,
        step: int,
        micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
        logs_acc: dict[str, torch.Tensor],
        found_inf: torch.Tensor,
        counted: torch.Tensor,
    ) -> torch.Tensor:
        """The discriminator's step on the generator step's images and reconstructions; adds its logs to
        ``logs_acc`` and returns the step's non-finite count flag, the generator's or its own."""
        tc, run, parts = self.tc, self.run, self.parts
        accum = run.accum
        parts.opt_d.zero_grad(set_to_none=True)
        for i, (x, recon) in enumerate(micro_batches):
            with distributed.no_sync_unless(self.disc_step, sync=i == accum - 1):
                with autocast(run.device, run.precision):
                    d_loss, d_logs = self.disc_step(x, recon, step)
                parts.scaler_d.scaled(d_loss / accum).backward()
            for k, v in d_logs.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + v.detach().float() / accum
        parts.scaler_d.unscale(parts.opt_d)
        d_norm = grad_norm_and_finite(parts.d_params, tc.grad_clip)
        # the discriminator steps only when the autoencoder did and its own gradient is finite
        d_skip, d_counted = parts.scaler_d.nonfinite(d_norm)
        optimizer_step(parts.opt_d, torch.maximum(found_inf, d_skip))
        parts.scaler_d.update()
        return torch.maximum(counted, d_counted)


def train_autoencoder(
    config: AutoencoderTrainingConfig,
    data: torch.utils.data.Dataset,
    tracker: Tracker | None = None,
    checkpoint_dir: str | None = None,
    *,
    perceptual: nn.Module | None | Literal["auto"] = "auto",
    should_stop: Callable[[int], bool] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    storage_options: dict[str, Any] | None = None,
    init_weights: dict[str, torch.Tensor] | None = None,
) -> AutoencoderTrainResult:
    """Train (or resume training) the autoencoder on ``data`` (items or ``get_batch`` → (B,3,H,W) in [−1, 1]).

    perceptual: "auto" builds LPIPS from the pretrained VGG (failing with the file it needs, unless the loss config
    allows training without it); a module or None injects one (tests).
    should_stop(step): checked after each step; True ends the run early, after a checkpoint (resume later). Under
    torchrun the run stops when any rank's should_stop says so.
    rank, world_size: default to the process group's (`ldm_core.distributed.init_distributed`); 0 of 1 without one.
    init_weights: the autoencoder's starting weights (a pretrained one, e.g. converted from diffusers), loaded strictly
    into the model built from ``config.model`` before the EMA and the optimizer see it; a checkpoint to resume from
    still wins. None: the seeded random initialisation.
    """
    tracker = tracker or NullTracker()
    tc = config.trainer
    run = RunSetup.create(tc, rank, world_size)
    if tc.strategy == "fsdp" and run.world_size > 1:
        # an SD-sized autoencoder (84 M parameters) and its discriminator fit every GPU many times over: sharding
        # them would add two all-gathers per block and step and save nothing that matters
        log.info("strategy fsdp shards the denoiser; the autoencoder trains under DDP on %d processes", run.world_size)
    parts = _build_autoencoder_parts(config, run, perceptual, init_weights)
    loop = TrainingLoop(
        tc, run, data, parts.checkpointed(), config.to_dict(), "model", "autoencoder", checkpoint_dir, storage_options
    )  # resumes from the newest checkpoint
    train_step = _AutoencoderStep(config, run, parts, loop)
    _start_autoencoder_run(tracker, config, run, loop, parts.perceptual_used)

    def log_reconstructions(step: int) -> None:
        if run.rank == 0 and train_step.last_images is not None:
            tracker.log_image(reconstruction_grid(*train_step.last_images), "reconstructions", step)

    meter = ThroughputMeter(
        run.device,
        run.precision,
        run.world_size,
        flops=lambda: autoencoder_step_flops(config, train_step.image_size, parts.perceptual_used),
    )
    parts.model.train()
    parts.loss_fn.train()
    finished = loop.run(
        train_step,
        tracker,
        meter,
        rate_name="images_per_second",
        should_stop=should_stop,
        images=log_reconstructions,
        image_every=tc.image_every,
    )
    if run.rank == 0 and finished:
        log_reconstructions(loop.step)
    final = (parts.ema.model if parts.ema is not None else parts.model).eval()
    return AutoencoderTrainResult(
        model=final.to(memory_format=torch.contiguous_format).cpu(),
        step=loop.step,
        perceptual_used=parts.perceptual_used,
        nonfinite_skipped=loop.guard.skipped,
        resumed_from=loop.resumed_from,
        history=loop.window.history,
        images_per_second=meter.rate(),
        finished=finished,
    )


def _start_autoencoder_run(
    tracker: Tracker, config: AutoencoderTrainingConfig, run: RunSetup, loop: TrainingLoop, perceptual_used: bool
) -> None:
    start_run(tracker, run, config.to_dict(), loop.resumed_from, perceptual_used=perceptual_used)
    if run.rank == 0:
        tracker.set_tags({"perceptual_used": str(perceptual_used).lower()})
        if not perceptual_used:
            log.warning(
                "training the autoencoder WITHOUT the LPIPS perceptual term (VGG weights unavailable, "
                "allowed by loss.allow_missing_perceptual)"
            )


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def measure_latent_scale(
    model: nn.Module,
    data: torch.utils.data.Dataset,
    max_items: int = 1024,
    batch_size: int = 32,
    use_shift: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
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
