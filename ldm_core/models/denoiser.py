"""The denoiser interface: what objectives, samplers and trainers may assume about the network.

Every denoiser backbone (the UNet, the MMDiT) is built from its typed config by ``build_denoiser`` and called as
``model(x, t, context, context_mask, pooled=None)``. The config's ``kind`` tag selects the backbone, so a
checkpoint's saved config rebuilds the right network: ``build_denoiser(parse_denoiser_config(d))``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from typing import Annotated, Any, Protocol, runtime_checkable

import torch
from pydantic import Discriminator, Tag, TypeAdapter
from torch import Tensor, nn

from ldm_core.config import StrictModel
from ldm_core.models.mmdit import MMDiT, MMDiTConfig
from ldm_core.models.unet import UNet, UNetConfig


def _backbone_kind(value: Any) -> str:
    """The tag of a denoiser config; a section without `kind` is a UNet (the default backbone)."""
    if isinstance(value, Mapping):
        return value.get("kind", "unet")
    return getattr(value, "kind", "unet")


# The network of each backbone config. Adding a backbone is one entry here: its config's `kind` default is its tag,
# and `DenoiserConfig` and `build_denoiser` follow from this table.
BACKBONES: dict[type[StrictModel], type[nn.Module]] = {UNetConfig: UNet, MMDiTConfig: MMDiT}


def _tag(config_cls: type[StrictModel]) -> str:
    return config_cls.model_fields["kind"].default


DenoiserConfig = Annotated[
    functools.reduce(operator.or_, (Annotated[config_cls, Tag(_tag(config_cls))] for config_cls in BACKBONES)),
    Discriminator(_backbone_kind),
]
"""Config of any denoiser backbone, told apart by its `kind` field ("unet" when absent)."""

_DENOISER_CONFIG_ADAPTER: TypeAdapter[Any] = TypeAdapter(DenoiserConfig)


@runtime_checkable
class Denoiser(Protocol):
    """A network that predicts the objective's target (noise, v or velocity) from a noisy latent.

    x: (B, C, H, W) noisy latents. t: (B,) float model time, or one value for the whole batch (0-d tensor or
    float); its scale is the objective's business (the sinusoidal features suit t in 0..1000). context: (B, L, D)
    text tokens. context_mask: (B, L) bool, True = real token; padding tokens have no effect on the output.
    pooled: (B, D_pool) pooled text vector, for backbones whose modulation takes one (the MMDiT pools the real
    tokens itself when it is None; the UNet ignores it). Returns (B, C_out, H, W).
    """

    def __call__(
        self,
        x: Tensor,
        t: Tensor | float,
        context: Tensor,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor: ...


def parse_denoiser_config(data: Mapping[str, Any]) -> DenoiserConfig:
    """Validate plain data (a run config section, a checkpoint's saved config) into the right config class."""
    return _DENOISER_CONFIG_ADAPTER.validate_python(dict(data))


def takes_pooled(config: DenoiserConfig) -> bool:
    """Whether the backbone conditions on the pooled text vector (the MMDiT's modulation; the UNet ignores it), so
    that training and sampling must hand it the text encoder's."""
    return isinstance(config, MMDiTConfig)


def build_denoiser(config: DenoiserConfig) -> nn.Module:
    """The backbone described by `config` (a DenoiserConfig), freshly initialised, in training mode."""
    for config_cls, backbone in BACKBONES.items():
        if isinstance(config, config_cls):
            return backbone(config)
    raise TypeError(f"no denoiser backbone for config {type(config).__name__}")


def backbone_summary(config: DenoiserConfig, preset: str | None = None) -> dict[str, Any]:
    """What a report says about a denoiser: {"kind", "preset" (the named preset it started from, None if none was
    named), "size" (its defining widths, in one line), "parameters"} (counted on the meta device: no memory)."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in build_denoiser(config).parameters())
    if isinstance(config, MMDiTConfig):
        size = (
            f"hidden_size {config.hidden_size}, depth {config.depth}, heads {config.num_heads}, "
            f"patch_size {config.patch_size}"
        )
    else:
        size = (
            f"model_channels {config.model_channels}, channel_mult {list(config.channel_mult)}, "
            f"res blocks {config.num_res_blocks}, attention at {list(config.attention_levels)}"
        )
    return {"kind": config.kind, "preset": preset, "size": size, "parameters": parameters}


def describe_backbone(summary: Mapping[str, Any]) -> str:
    """One line from `backbone_summary`: "mmdit, preset tiny (hidden_size 96, …): 1,356,880 parameters"."""
    preset = f", preset {summary['preset']}" if summary.get("preset") else ""
    return f"{summary['kind']}{preset} ({summary['size']}): {int(summary['parameters']):,} parameters"


__all__ = [
    "BACKBONES",
    "Denoiser",
    "DenoiserConfig",
    "backbone_summary",
    "build_denoiser",
    "describe_backbone",
    "parse_denoiser_config",
    "takes_pooled",
]
