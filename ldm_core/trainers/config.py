"""What every trainer's config has: the fields both stages share (each stage's config adds its optimizer and its
own options)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ldm_core.config import StrictModel

Precision = Literal["auto", "fp32", "bf16", "fp16"]
"""Autocast precision of a forward pass; "auto" = bf16 where the device computes it natively, else fp32."""
Strategy = Literal["auto", "ddp", "fsdp"]
"""How several processes share the training: "ddp" replicates the model on every rank (DistributedDataParallel);
"fsdp" shards parameters, gradients, optimizer state and the EMA over the ranks (FSDP2 `fully_shard`) and writes
sharded (DCP) checkpoints; "auto" = fsdp for a denoiser of `FSDP_AUTO_PARAMETERS` parameters or more, else ddp."""


class TrainerConfig(StrictModel):
    """The fields both trainers share (each stage's config adds its optimizer and its own options)."""

    steps: int = Field(1000, ge=1)
    """Optimizer steps to train for (total, across resumes)."""
    batch_size: int = Field(8, ge=1)
    """Global batch per optimizer step: micro_batch_size × grad_accum × world size."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Samples per forward pass on one process; None = the whole per-process batch (no accumulation). Accumulation
    steps derive from it: batch_size / (micro_batch_size × world size), which must divide exactly."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Max global gradient norm per optimizer; None disables clipping."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to lr over this many steps."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: constant, or cosine decay to min_lr_ratio·lr at the last step."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Floor of the cosine schedule, as a fraction of lr."""
    precision: Precision = "fp32"
    """Autocast precision of the forward pass; "auto" = bf16 where the device has it."""
    device: str = "auto"
    """"auto" (CUDA if present, else CPU), or any torch device string."""
    checkpoint_every: int = Field(500, ge=1)
    """Write a resumable checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many checkpoints to keep; older ones are pruned after a newer one is committed."""
    max_nonfinite_steps: int = Field(10, ge=0)
    """Skip steps with a NaN/inf loss or gradient; stop the run once more than this many were skipped."""
    log_every: int = Field(10, ge=1)
    """Send step metrics to the tracker every N steps."""
    seed: int = 0
    """Seeds the data order and every random draw of the step (noise, times, posterior samples, caption dropout)."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes that load ahead of the step (0 = load in the training process)."""
    channels_last: bool = False
    """Run convolutions in channels_last memory format (NHWC: what tensor cores and oneDNN prefer)."""
    strategy: Strategy = "auto"
    """How several processes share the training (`Strategy`); with one process "fsdp" still writes sharded (DCP)
    checkpoints, so that a run can move between process counts."""
    compile: bool = False
    """torch.compile the model for training (Inductor): worth it on GPUs for long runs; the first steps pay the
    compilation (minutes on a 2-core CPU, where eager is usually as fast)."""

    @model_validator(mode="after")
    def _check_batch(self) -> TrainerConfig:
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}"
            )
        return self
