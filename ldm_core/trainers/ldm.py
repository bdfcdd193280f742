"""Stage 2: train the text-conditioned denoiser on cached latents and text embeddings, resumably.

``train_ldm(config, latents, tracker, uncond=…)`` reads batches of {latents, context, context_mask, pooled} (from the
latent store, or in tests from tensors in memory through the same dataset interface), draws the objective's
training pair, drops captions to the empty prompt with probability ``cond_dropout`` (classifier-free guidance), and
steps AdamW with warmup, clipping, EMA, bf16 autocast and gradient accumulation. A backbone whose modulation takes
the pooled text vector (the MMDiT) gets the batch's, and a dropped caption's is the null caption's; the UNet is
never handed one, so its steps do not depend on whether the batches carry them. The loop around the step (resume,
logging, checkpoints, early stop) is the autoencoder trainer's: `ldm_core.trainers.loop`.

Under torchrun (see `ldm_core.distributed`) the denoiser is wrapped in DistributedDataParallel and every rank trains
on its rows of each global batch; timesteps, noise and caption dropout are drawn for the global batch, so N processes
take the same steps as one process with the same global batch. Rank 0 alone tracks, samples and checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ldm_core import distributed
from ldm_core.config import StrictModel
from ldm_core.diffusion import DiffusionConfig, create_diffusion
from ldm_core.diffusion.guidance import drop_conditioning
from ldm_core.flops import denoiser_step_flops
from ldm_core.fsdp import OptimizerState, ShardedEMA, build_sharded, gather_module, is_sharded, resolve_strategy
from ldm_core.lora import AdapterEMA, LoraConfig, add_lora, checkpoint_parts
from ldm_core.models.denoiser import DenoiserConfig, backbone_summary, build_denoiser, takes_pooled
from ldm_core.models.unet import UNetConfig
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


class LDMTrainerConfig(TrainerConfig):
    """The stage-2 trainer: the shared fields (`TrainerConfig`) plus AdamW with its schedule, the EMA and
    classifier-free guidance dropout."""

    batch_size: int = Field(32, ge=1)
    """Global batch per optimizer step: micro_batch_size × grad_accum × world size."""
    lr: float = Field(1e-4, gt=0)
    """Peak AdamW learning rate (LDM/SD-1: 1e-4)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    ema_decay: float | None = Field(0.999, ge=0, lt=1)
    """EMA of the denoiser's weights (the exported model) when set; None exports the raw weights."""
    cond_dropout: float = Field(0.1, ge=0, le=1)
    """Probability of replacing a caption by the empty prompt (classifier-free guidance training)."""
    validation_every: int = Field(0, ge=0)
    """Render validation samples for fixed prompts every N steps through ``sample_fn`` (0 = only at the end)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, for one more forward pass per step."""
    sample_posterior: bool = False
    """Train on a posterior sample z ~ N(mean, exp(logvar)) per image, drawn anew every epoch, as SD-1 and diffusers'
    scripts do, rather than on the posterior mean (the default). It needs a latent store of moments, and a dataset
    built with it (``LatentDataset(..., sample_posterior=True, seed=trainer.seed)``, which the pipeline does); the
    trainer checks the two agree."""


class LDMTrainingConfig(StrictModel):
    """Everything stage 2 needs: the denoiser backbone, the diffusion objective, and the trainer."""

    denoiser: DenoiserConfig = Field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    trainer: LDMTrainerConfig = Field(default_factory=LDMTrainerConfig)
    lora: LoraConfig | None = None
    """Train a LoRA adapter (peft) on the frozen denoiser instead of the whole denoiser; None = full training."""


@dataclass
class LDMTrainResult:
    model: nn.Module | None
    """The trained denoiser on CPU in eval mode (the EMA weights when ema_decay is set); with ``lora``, the frozen
    base carrying the trained adapter (`ldm_core.lora`). Under fsdp on several processes the whole model is gathered
    on rank 0 only: None on the other ranks."""
    step: int
    nonfinite_skipped: int
    resumed_from: int | None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    samples_per_second: float = 0.0
    finished: bool = True


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------

_NO_POOLED = (
    "the {kind} denoiser takes the pooled text vector, and {what}: train it on a latent store's LatentDataset with "
    "its uncond(), which carry the vectors encode_dataset cached, or add the text encoder's pooled vectors "
    "(TextEncoder.encode(...).pooled) to the batches and the null caption"
)


@dataclass
class _DenoiserParts:
    """What the stage-2 trainer trains and steps with."""

    model: nn.Module
    """The denoiser (with ``lora``: the frozen base carrying the adapter; under fsdp on several processes: sharded)."""
    ema: EMA | AdapterEMA | ShardedEMA | None
    params: list[nn.Parameter]
    """What the optimizer steps: the whole denoiser, or the adapter."""
    opt: torch.optim.Optimizer
    scaler: LossScaler
    lora: bool
    strategy: str = "ddp"
    """"ddp" or "fsdp" (resolved): fsdp shards the model over the processes and writes sharded checkpoints."""
    build: Callable[[], nn.Module] | None = None
    """A whole, unsharded denoiser on CPU (what the sharded weights are gathered into)."""
    rank: int = 0

    @property
    def sharded(self) -> bool:
        return is_sharded(self.model)

    def checkpointed(self) -> dict[str, Any]:
        if self.strategy == "fsdp":  # by parameter name, in this rank's shards: loads into any process count
            trained = {"model": self.model, "opt": OptimizerState(self.model, self.opt)}
        else:  # with an adapter only it is saved; a full run saves the whole denoiser
            trained = {**(checkpoint_parts(self.model) if self.lora else {"model": self.model}), "opt": self.opt}
        return checkpointed_parts(trained, self.ema, {"scaler": self.scaler})

    def exported(self) -> nn.Module | None:
        """The weights the run hands on: the EMA's when it keeps one. A sharded model is gathered (a collective:
        every rank calls this) into a whole one on CPU on rank 0; the other ranks get None."""
        if not self.sharded:
            return self.ema.model if self.ema is not None else self.model
        assert self.build is not None
        state = self.ema.state_dict() if self.ema is not None else self.model.state_dict()
        module = gather_module(state, self.build, self.rank)
        return module.requires_grad_(False) if module is not None else None


def _build_denoiser_parts(
    config: LDMTrainingConfig, run: RunSetup, init_weights: dict[str, torch.Tensor] | None
) -> _DenoiserParts:
    """The denoiser (the seeded generator draws its initial weights), its EMA, AdamW and the loss scale."""
    tc, device = config.trainer, run.device
    model_cfg = (
        config.denoiser.model_copy(update={"gradient_checkpointing": tc.gradient_checkpointing})
        if hasattr(config.denoiser, "gradient_checkpointing")
        else config.denoiser
    )
    strategy = resolve_strategy(tc.strategy, backbone_summary(model_cfg)["parameters"])  # counted on meta
    if config.lora is not None and strategy == "fsdp":
        raise ValueError(
            "lora trains a small adapter on a frozen base: use strategy ddp (fsdp shards whole-model training)"
        )

    def warm_start(model: nn.Module) -> None:
        if init_weights is not None:
            load_init_weights(model, init_weights, "denoiser")

    sharded = strategy == "fsdp" and run.world_size > 1
    if sharded:  # built in shards, before the EMA and the optimizer: both keep this rank's shards
        model = build_sharded(lambda: build_denoiser(model_cfg), device, run.precision, run.rank, warm_start)
    else:
        model = build_denoiser(model_cfg)
        warm_start(model)
        if config.lora is not None:  # the base frozen; only the adapter trains, and only it is checkpointed
            model = add_lora(model, config.lora)
        model = model.to(device).train()
    if not tc.ema_decay:
        ema = None
    elif sharded:
        ema = ShardedEMA(model, tc.ema_decay)
    else:
        ema = (AdapterEMA if config.lora is not None else EMA)(model, tc.ema_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_adam(params, device, adamw=True, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    scaler = LossScaler(run.precision, device)
    return _DenoiserParts(
        model,
        ema,
        params,
        opt,
        scaler,
        config.lora is not None,
        strategy=strategy,
        build=lambda: build_denoiser(model_cfg).eval(),
        rank=run.rank,
    )


@dataclass
class _NullCaption:
    """The empty prompt on the run's device, what caption dropout swaps a caption for."""

    context: torch.Tensor
    """(1, L, D)"""
    mask: torch.Tensor
    """(1, L)"""
    pooled: torch.Tensor | None
    """(1, D_pool), only for a backbone that takes the pooled vector: the UNet is never handed one."""


def _null_caption(config: LDMTrainingConfig, uncond: tuple[torch.Tensor, ...], device: torch.device) -> _NullCaption:
    pooled = uncond[2] if len(uncond) > 2 else None
    if takes_pooled(config.denoiser):
        if pooled is None:
            raise ValueError(_NO_POOLED.format(kind=config.denoiser.kind, what="the null caption (uncond) has none"))
        pooled = pooled.to(device).float()
    else:
        pooled = None
    return _NullCaption(uncond[0].to(device).float(), uncond[1].to(device), pooled)


def _check_posterior_sampling(latents: torch.utils.data.Dataset, tc: LDMTrainerConfig) -> None:
    """The dataset draws posterior samples exactly when the trainer says it trains on them."""
    draws = getattr(latents, "sample_posterior", False)
    if draws != tc.sample_posterior:
        raise ValueError(
            f"trainer.sample_posterior is {tc.sample_posterior}, but the latent dataset "
            f"{'draws posterior samples' if draws else 'gives fixed latents'}: build it with "
            f"LatentDataset(..., sample_posterior={tc.sample_posterior}, seed=trainer.seed)"
        )


class _DenoiserStep:
    """One optimizer step of stage 2, accumulated over micro-batches: caption dropout, the objective's training pair,
    the loss, then clipping, the (skippable) optimizer step and the EMA. It records the latent and context shapes of
    the first batch for the FLOPs count."""

    def __init__(
        self,
        config: LDMTrainingConfig,
        run: RunSetup,
        parts: _DenoiserParts,
        loop: TrainingLoop,
        null: _NullCaption,
    ):
        self.config, self.tc, self.run, self.parts, self.loop, self.null = (
            config,
            config.trainer,
            run,
            parts,
            loop,
            null,
        )
        self.diffusion = create_diffusion(config.diffusion)
        # DDP after the resume (its construction broadcasts rank 0's state; every rank has loaded the same checkpoint)
        model = parts.model
        if self.tc.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # compile the module DDP wraps (the EMA and the checkpoints keep using the plain module: same parameters);
        # a sharded model reduces its own gradients
        net = torch.compile(model) if self.tc.compile else model
        self.net = net if parts.sharded else distributed.wrap_ddp(net, run.device)
        self.shapes: tuple | None = None  # (latent (C, h, w), context (L, D)), known after the first batch

    def __call__(self, step: int) -> StepOutput:
        tc, run, parts = self.tc, self.run, self.parts
        lr = lr_at(step, tc.lr, tc.warmup_steps, tc.steps, tc.lr_schedule, tc.min_lr_ratio)
        set_lr(parts.opt, lr)
        parts.opt.zero_grad(set_to_none=True)
        loss_acc = torch.zeros((), device=run.device)
        for i in range(run.accum):
            loss = self._micro_batch_loss(self.loop.stream.next(), sync=i == run.accum - 1)
            loss_acc += loss.detach() / run.accum
        parts.scaler.unscale(parts.opt)
        gnorm = grad_norm_and_finite(parts.params, tc.grad_clip)
        # device-side: the fused optimizer skips, no host sync
        found_inf, counted = parts.scaler.nonfinite(gnorm, loss_acc)
        optimizer_step(parts.opt, found_inf)
        parts.scaler.update()
        self.loop.guard.record(counted)
        if parts.ema is not None:
            parts.ema.update(parts.model, skip=found_inf)
        return StepOutput({"loss": loss_acc, "grad_norm": gnorm}, extra={"lr": lr})

    def _micro_batch_loss(self, batch: dict[str, torch.Tensor], sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (this rank's rows of the global micro-batch); gradients are
        all-reduced only when ``sync``, after the last."""
        run, accum, device = self.run, self.run.accum, self.run.device
        x0 = batch["latents"].to(device, non_blocking=True).float()  # (b, C, h, w), already scaled
        ctx, mask, pooled = self._conditioning(batch)
        sample = self.diffusion.training_sample(x0, run.gen, shard=run.shard)
        with distributed.no_sync_unless(self.parts.model if self.parts.sharded else self.net, sync=sync):
            with autocast(device, run.precision):
                pred = self.net(sample.x_t, sample.t_model, ctx, mask, pooled=pooled)
            loss = self.diffusion.loss(pred.float(), sample)
            self.parts.scaler.scaled(loss / accum).backward()
        if self.shapes is None:
            self.shapes = (tuple(x0.shape[1:]), tuple(ctx.shape[1:]))
        return loss

    def _conditioning(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The batch's captions, each dropped to the null caption with probability ``cond_dropout`` (drawn for the
        global batch): context (b, L, D), mask (b, L), pooled (b, D_pool) or None."""
        device, null = self.run.device, self.null
        ctx = batch["context"].to(device, non_blocking=True).float()  # (b, L, D)
        mask = batch["context_mask"].to(device, non_blocking=True).bool()  # (b, L)
        pooled = None
        if null.pooled is not None:
            if "pooled" not in batch:
                raise ValueError(
                    _NO_POOLED.format(kind=self.config.denoiser.kind, what="the training batches have no 'pooled'")
                )
            pooled = batch["pooled"].to(device, non_blocking=True).float()  # (b, D_pool)
        return drop_conditioning(
            ctx,
            mask,
            null.context,
            null.mask,
            self.tc.cond_dropout,
            self.run.gen,
            shard=self.run.shard,
            pooled=pooled,
            uncond_pooled=null.pooled,
        )


@dataclass
class PreparedLDMRun:
    """What `train_ldm` steps with, built and resumed: ``loop.run(step, …)`` trains. `benchmarks.end_to_end` times
    this same loop and step."""

    run: RunSetup
    parts: _DenoiserParts
    loop: TrainingLoop
    step: _DenoiserStep


def prepare_ldm_training(
    config: LDMTrainingConfig,
    latents: torch.utils.data.Dataset,
    *,
    uncond: tuple[torch.Tensor, ...],
    checkpoint_dir: str | None = None,
    init_weights: dict[str, torch.Tensor] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> PreparedLDMRun:
    """The denoiser, its EMA and optimizer, resumed from the newest checkpoint in ``checkpoint_dir`` (if any), the
    training loop over ``latents`` and the step (arguments as `train_ldm`'s)."""
    tc = config.trainer
    run = RunSetup.create(tc, rank, world_size)
    parts = _build_denoiser_parts(config, run, init_weights)
    null = _null_caption(config, uncond, run.device)
    _check_posterior_sampling(latents, tc)
    # resumes from the newest checkpoint, of the same denoiser and adapter configs (a full run's has no adapter)
    loop = TrainingLoop(
        tc,
        run,
        latents,
        parts.checkpointed(),
        config.to_dict(),
        ("denoiser", "lora"),
        "LDM",
        checkpoint_dir,
        storage_options,
        sharded_checkpoints=parts.strategy == "fsdp",
    )
    return PreparedLDMRun(run, parts, loop, _DenoiserStep(config, run, parts, loop, null))


def train_ldm(
    config: LDMTrainingConfig,
    latents: torch.utils.data.Dataset,
    tracker: Tracker | None = None,
    *,
    uncond: tuple[torch.Tensor, ...],
    checkpoint_dir: str | None = None,
    sample_fn: Callable[[nn.Module, int], np.ndarray] | None = None,
    should_stop: Callable[[int], bool] | None = None,
    init_weights: dict[str, torch.Tensor] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> LDMTrainResult:
    """Train (or resume) the denoiser on batches ``{"latents", "context", "context_mask"[, "pooled"]}`` (latents
    already scaled; "pooled" (B, D_pool) is required by a backbone that takes it, the MMDiT, and unused otherwise).

    uncond: the empty prompt's (context (1, L, D), mask (1, L)[, pooled (1, D_pool) or None]) for caption dropout
    (`LatentDataset.uncond()`); the pooled vector is required with the MMDiT.
    sample_fn(model, step) -> uint8 image grid: validation samples for fixed prompts, sent to the tracker.
    should_stop(step): checked after each step; True ends the run early after a checkpoint (under torchrun: when any
    rank's says so).
    init_weights: the denoiser's starting weights (a warm start: a registered model, a converted diffusers
    backbone), loaded strictly into the model built from ``config.denoiser`` before the EMA and the optimizer see it;
    a checkpoint to resume from still wins. None: the seeded random initialisation. With ``config.lora`` these are
    the base the adapter trains on, and a resume checks that it is the same base.
    rank, world_size: default to the process group's (`ldm_core.distributed.init_distributed`); 0 of 1 without one.
    """
    tracker = tracker or NullTracker()
    prepared = prepare_ldm_training(
        config,
        latents,
        uncond=uncond,
        checkpoint_dir=checkpoint_dir,
        init_weights=init_weights,
        rank=rank,
        world_size=world_size,
        storage_options=storage_options,
    )
    run, parts, loop, train_step = prepared.run, prepared.parts, prepared.loop, prepared.step
    start_run(
        tracker, run, config.to_dict(), loop.resumed_from, denoiser_parameters=sum(p.numel() for p in parts.params)
    )

    def log_samples(step: int) -> None:  # on every rank: a sharded model is gathered by all of them
        model = parts.exported()
        if run.rank == 0 and sample_fn is not None:
            tracker.log_image(sample_fn(model, step), "validation_samples", step)

    meter = ThroughputMeter(
        run.device,
        run.precision,
        run.world_size,
        flops=lambda: {"step": denoiser_step_flops(config.denoiser, *train_step.shapes)},
    )
    finished = loop.run(
        train_step,
        tracker,
        meter,
        should_stop=should_stop,
        # a sharded model is gathered by every rank, also those without a sample_fn (only rank 0 has one)
        images=log_samples if sample_fn is not None or parts.sharded else None,
        image_every=config.trainer.validation_every,
    )
    return _finish(parts, run, loop, tracker, sample_fn, finished, meter.rate())


def _finish(
    parts: _DenoiserParts,
    run: RunSetup,
    loop: TrainingLoop,
    tracker: Tracker,
    sample_fn: Callable[[nn.Module, int], np.ndarray] | None,
    finished: bool,
    rate: float,
) -> LDMTrainResult:
    """The run's result: the exported model (gathered on rank 0 when sharded, every rank taking part), and its last
    validation grid when the run finished."""
    final = parts.exported()
    if final is not None:
        final = final.eval().cpu()
    if run.rank == 0 and finished and sample_fn is not None:
        tracker.log_image(sample_fn(final, loop.step), "validation_samples", loop.step)
    return LDMTrainResult(
        model=final,
        step=loop.step,
        nonfinite_skipped=loop.guard.skipped,
        resumed_from=loop.resumed_from,
        history=loop.window.history,
        samples_per_second=rate,
        finished=finished,
    )
