"""LoRA fine-tuning of a denoiser through peft (the library diffusers' own LoRA training uses).

``add_lora(model, config)`` freezes the denoiser and injects a low-rank adapter (Hu et al. 2021): each targeted
Linear computes ``W x + (alpha / r) · B A x``, with A (r, d_in) drawn N(0, 1/r) and B (d_out, r) zero, so the
adapted model starts as the base, bit for bit (diffusers' `train_text_to_image_lora.py` initialises the same way:
``init_lora_weights="gaussian"``). Only A and B train.

Which layers are "the attention projections". diffusers' script targets ``to_q, to_k, to_v, to_out.0`` of every
attention. Our attention stacks the projections that read the same input into one Linear
(`ldm_core.models.fused_projections`): ``qkv`` (a self-attention's, and each MMDiT stream's), ``to_kv`` (a
cross-attention's keys and values of the text) beside ``to_q``, and ``to_out``. The default targets are all four
names, so every attention weight diffusers adapts is adapted here too, but a rank-r LoRA on a fused ``qkv`` is one
adapter with A shared by q, k and v: its update has rank ≤ r and r·(d + 3d) parameters, where diffusers' three
separate rank-r adapters make a block update of rank ≤ 3r with 3·r·(d + d) parameters (for ``to_kv``: rank ≤ r and
r·(d_ctx + 2d) against 2r·(d_ctx + d)). It is the cheaper adapter (one thin matmul where diffusers runs three); to
give q, k and v more room, raise the rank.

A training checkpoint holds the adapter (and its optimizer and EMA state), never a copy of the base: the parts
`checkpoint_parts` returns save only the adapter and record the base's content hash, which a resume checks, so an
adapter is never resumed on other base weights.
"""

from __future__ import annotations

import copy
import itertools

import peft
import torch
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import Field
from torch import nn

from ldm_core.config import StrictModel
from ldm_core.model_io import state_dict_sha256
from ldm_core.trainers.step import EMA

ATTENTION_PROJECTIONS = ("qkv", "to_q", "to_kv", "to_out")
"""Every attention projection of both backbones, by the Linear's name (the fused ones included; the MMDiT has qkv
and to_out only)."""

_ADAPTER = "default"  # peft's adapter name; a denoiser carries one adapter
_PREFIX = LoraModel.prefix  # "lora_": peft names every adapter parameter with it


class LoraConfig(StrictModel):
    """A LoRA adapter on the denoiser: which Linear layers, and its rank, scale and dropout."""

    rank: int = Field(4, ge=1)
    """r, the rank of each adapted layer's update B·A (diffusers' script: 4). A fused qkv gets one rank-r update,
    not three (see the module's docstring)."""
    alpha: float | None = Field(None, gt=0)
    """The update is scaled by alpha / rank; None = rank (a scale of 1, as diffusers' script sets it)."""
    target_modules: list[str] | None = Field(None, min_length=1)
    """Names of the Linear layers to adapt (a name matches a layer whose path ends with it), each of which must name
    one. None = every attention projection the backbone has: qkv, to_q, to_kv, to_out (the MMDiT: qkv, to_out)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input (peft's lora_dropout). Its masks come from the global RNG, so with dropout
    N processes do not take exactly the steps of one."""

    def peft_config(self, targets: list[str]) -> peft.LoraConfig:
        return peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha or self.rank,
            lora_dropout=self.dropout,
            target_modules=targets,
            init_lora_weights="gaussian",
            bias="none",
        )


# ---------------------------------------------------------------------------------------------------------------
# The adapted model
# ---------------------------------------------------------------------------------------------------------------


def _targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The configured targets, each checked to name a Linear of ``model`` (peft only refuses when none does), or
    the model's attention projections."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]

    def names_one(target: str) -> bool:
        return any(name == target or name.endswith(f".{target}") for name in linears)

    own = [t for t in ATTENTION_PROJECTIONS if names_one(t)]
    for target in config.target_modules or []:
        if not names_one(target):
            raise ValueError(
                f"lora.target_modules: {target!r} names no Linear layer of the "
                f"{getattr(model.config, 'kind', 'denoiser')} denoiser; its attention projections are "
                f"{', '.join(own)}"
            )
    return list(config.target_modules or own)


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """``model`` frozen, with a fresh adapter injected in place (its A drawn from the global RNG); returned."""
    if has_lora(model):
        raise ValueError("the denoiser already carries a LoRA adapter")
    targets = _targets(model, config)
    model.requires_grad_(False)
    return peft.inject_adapter_in_model(config.peft_config(targets), model, adapter_name=_ADAPTER)


def has_lora(model: nn.Module) -> bool:
    return _ADAPTER in getattr(model, "peft_config", {})


def lora_config(model: nn.Module) -> LoraConfig:
    """The config of the adapter ``model`` carries (its targets resolved: the layer names it adapts)."""
    pc = model.peft_config[_ADAPTER]
    return LoraConfig(rank=pc.r, alpha=pc.lora_alpha, target_modules=sorted(pc.target_modules), dropout=pc.lora_dropout)


def is_adapter_weight(name: str) -> bool:
    return f".{_PREFIX}" in f".{name}"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft's naming (``…qkv.lora_A.weight``), without the base."""
    return get_peft_model_state_dict(model, adapter_name=_ADAPTER)


def load_adapter_state_dict(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Set the adapter's weights strictly: every key of the model's adapter, each of its shape, nothing else."""
    own = adapter_state_dict(model)
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    wrong = [k for k in own.keys() & weights.keys() if own[k].shape != weights[k].shape]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise ValueError(
            f"the adapter weights do not fit this LoRA config (rank, target_modules): {len(missing)} "
            f"missing, {len(unexpected)} unexpected, {len(wrong)} of another shape (e.g. {first})"
        )
    set_peft_model_state_dict(model, weights, adapter_name=_ADAPTER)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights under the names the unadapted model gives them (a plain model's state dict as it is)."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if not is_adapter_weight(k)}


def base_sha256(model: nn.Module) -> str:
    """The base weights' content hash: the ``weights_sha256`` they have when saved alone (`ldm_core.model_io`)."""
    return state_dict_sha256(base_state_dict(model))


def merged(model: nn.Module) -> nn.Module:
    """A plain denoiser (no adapter) whose Linear weights are W + (alpha / r)·B·A: what a consumer that knows no
    LoRA (a diffusers export) takes. ``model`` is left as it is."""
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)  # refuses an update that makes a weight non-finite
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, module.get_base_layer())
    del out.peft_config
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training: the EMA and the checkpoint parts of an adapter
# ---------------------------------------------------------------------------------------------------------------


class AdapterEMA(EMA):
    """The EMA of the adapter alone. Its model shares the frozen base tensors with the trained model (no second
    copy of the base in memory), and its state is the averaged adapter."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        frozen = itertools.chain(model.named_parameters(), model.named_buffers())
        shared = {id(t): t for name, t in frozen if not is_adapter_weight(name)}
        self.model = copy.deepcopy(model, memo=shared).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @staticmethod
    def _adapter(model: nn.Module) -> list[torch.Tensor]:
        return [p for name, p in model.named_parameters() if is_adapter_weight(name)]

    @torch.no_grad()
    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        ema_p, src_p = self._adapter(self.model), [p.detach() for p in self._adapter(model)]
        weight = 1.0 - self.decay if skip is None else (1.0 - skip.to(ema_p[0].dtype)) * (1.0 - self.decay)
        torch._foreach_lerp_(ema_p, src_p, weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return adapter_state_dict(self.model)

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        load_adapter_state_dict(self.model, sd)


class AdapterWeights:
    """A checkpoint part: the trained adapter of ``model`` (not its base)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return adapter_state_dict(self.model)

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        load_adapter_state_dict(self.model, sd)


class BaseIdentity:
    """A checkpoint part: the content hash of the base the adapter trains on, checked on resume (the checkpoint
    does not hold the base, so a resume must rebuild the same one)."""

    def __init__(self, model: nn.Module):
        self.sha256 = base_sha256(model)

    def state_dict(self) -> dict[str, str]:
        return {"sha256": self.sha256}

    def load_state_dict(self, sd: dict[str, str]) -> None:
        if sd["sha256"] != self.sha256:
            raise ValueError(
                f"the checkpoint's LoRA adapter was trained on base weights {sd['sha256'][:12]}…, this "
                f"run's base is {self.sha256[:12]}…: resume with the same base (seed, init weights), or "
                "point the checkpoint directory elsewhere to start a new run"
            )


def checkpoint_parts(model: nn.Module) -> dict[str, BaseIdentity | AdapterWeights]:
    """What a LoRA run checkpoints in place of the whole model: the base's hash (first: a wrong base fails before
    anything loads) and the adapter."""
    return {"base": BaseIdentity(model), "model": AdapterWeights(model)}


__all__ = [
    "ATTENTION_PROJECTIONS",
    "AdapterEMA",
    "LoraConfig",
    "adapter_state_dict",
    "add_lora",
    "base_sha256",
    "base_state_dict",
    "checkpoint_parts",
    "has_lora",
    "is_adapter_weight",
    "load_adapter_state_dict",
    "lora_config",
    "merged",
]
