"""Conversion to and from diffusers models, with identical outputs for identical weights.

``from_diffusers(model)`` accepts a diffusers ``AutoencoderKL``, ``UNet2DConditionModel`` or
``SD3Transformer2DModel`` and returns ours; ``to_diffusers(model)`` does the reverse. diffusers is imported lazily:
it is only needed when converting.
"""

from __future__ import annotations

from typing import Any


def from_diffusers(model: Any) -> Any:
    name = type(model).__name__
    if name == "AutoencoderKL":
        from ldm_core.interop.autoencoder import autoencoder_from_diffusers

        return autoencoder_from_diffusers(model)
    if name == "UNet2DConditionModel":
        from ldm_core.interop.unet import unet_from_diffusers

        return unet_from_diffusers(model)
    if name == "SD3Transformer2DModel":
        from ldm_core.interop.mmdit import mmdit_from_diffusers

        return mmdit_from_diffusers(model)
    raise TypeError(
        f"no conversion from diffusers {name}; supported: AutoencoderKL, UNet2DConditionModel, SD3Transformer2DModel"
    )


def to_diffusers(model: Any) -> Any:
    name = type(model).__name__
    if name == "AutoencoderKL":
        from ldm_core.interop.autoencoder import autoencoder_to_diffusers

        return autoencoder_to_diffusers(model)
    if name == "UNet":
        from ldm_core.interop.unet import unet_to_diffusers

        return unet_to_diffusers(model)
    if name == "MMDiT":
        from ldm_core.interop.mmdit import mmdit_to_diffusers

        return mmdit_to_diffusers(model)
    raise TypeError(f"no conversion to diffusers for {name}; supported: AutoencoderKL, UNet, MMDiT")


__all__ = ["from_diffusers", "to_diffusers"]
