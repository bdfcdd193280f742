"""The first stage: a convolutional autoencoder with a KL-regularized (or, for the ablation, VQ-regularized) latent.

Architecture of Esser et al. 2021 (VQGAN) / Rombach et al. 2022 (LDM, "first stage"): an encoder of residual blocks
with a mid-block self-attention, a diagonal Gaussian posterior over a latent of ``z_channels`` channels at
``2**(len(ch_mult)-1)``× spatial compression, and a mirrored decoder. The layer structure matches diffusers'
``AutoencoderKL`` one to one, so weights convert exactly (see ``ldm_core.interop.autoencoder``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm_core.config import StrictModel
from ldm_core.models.attention import attention

# ---------------------------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------------------------


class AutoencoderConfig(StrictModel):
    kind: Literal["kl", "vq"] = "kl"
    """Latent regularization: a diagonal Gaussian with a tiny KL ("kl"), or a discrete codebook ("vq", the ablation)."""
    in_channels: int = 3
    """Image channels in."""
    out_channels: int = 3
    """Image channels out."""
    ch: int = 128
    """Base width; level i has ch·ch_mult[i] channels."""
    ch_mult: list[int] = Field(default_factory=lambda: [1, 2, 4, 4])
    """Channel multiplier per resolution level; len(ch_mult)-1 downsamplings, so f = 2**(len-1)."""
    num_res_blocks: int = 2
    """Residual blocks per level in the encoder (the decoder uses one more, as in LDM)."""
    z_channels: int = 4
    """Latent channels (4 for SD-1's kl-f8, 16 for SD3/FLUX-style latents)."""
    norm_groups: int = 32
    """GroupNorm groups; must divide every level's width."""
    mid_attention: bool = True
    """Self-attention in the mid block of encoder and decoder (diffusers: mid_block_add_attention)."""
    use_quant_conv: bool = True
    """1×1 conv on the posterior moments (quant_conv) as in LDM; off in some VAEs (SD3's)."""
    use_post_quant_conv: bool = True
    """1×1 conv on the latent before decoding (post_quant_conv)."""
    n_embed: int = 1024
    """VQ only: codebook size."""
    vq_beta: float = 0.25
    """VQ only: commitment weight β on ‖sg[e] − z‖² (van den Oord et al. 2017)."""
    resolution: int = 256
    """Training image resolution (informational: the model is fully convolutional)."""
    scaling_factor: float = 1.0
    """Latent scale 1/std measured on the data after training (SD-1: 0.18215); latents are (z − shift)·scale."""
    shift_factor: float = 0.0
    """Latent shift (mean) subtracted before scaling (SD3 uses one; SD-1 does not)."""
    gradient_checkpointing: bool = False
    """Recompute each residual/attention block's activations in the backward pass instead of storing them: less
    memory for a second forward of those blocks (what it saves and costs: `python -m benchmarks.memory`)."""

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data):
        """``{"preset": "kl-f8", "z_channels": 16}`` starts from a named preset and overrides fields."""
        if isinstance(data, dict) and "preset" in data:
            data = dict(data)
            name = data.pop("preset")
            if name not in AUTOENCODER_PRESETS:
                raise ValueError(f"unknown autoencoder preset {name!r}; choose from {sorted(AUTOENCODER_PRESETS)}")
            data = {**AUTOENCODER_PRESETS[name].model_dump(), **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> AutoencoderConfig:
        if not self.ch_mult:
            raise ValueError("ch_mult must have at least one level")
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_groups:
                raise ValueError(f"norm_groups={self.norm_groups} does not divide level width ch*{m}={self.ch * m}")
        if self.num_res_blocks < 1:
            raise ValueError("num_res_blocks must be >= 1")
        return self

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample_factor:
            raise ValueError(
                f"image size {image_size} is not divisible by the downsampling factor {self.downsample_factor}"
            )
        s = image_size // self.downsample_factor
        return (self.z_channels, s, s)


AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    # CPU tests and the demo: 32×32 images -> 8×8×4 latents, a few hundred thousand parameters
    "tiny": AutoencoderConfig(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4, norm_groups=8, resolution=32),
    # the VQ ablation at the tiny size
    "tiny-vq": AutoencoderConfig(
        kind="vq", ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4, norm_groups=8, n_embed=256, resolution=32
    ),
    # LDM's kl-f4 (z=3) and the SD-1 first stage kl-f8
    "kl-f4": AutoencoderConfig(ch=128, ch_mult=[1, 2, 4], num_res_blocks=2, z_channels=3),
    "kl-f8": AutoencoderConfig(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4),
    # 16 latent channels as in SD3 / FLUX
    "kl-f8c16": AutoencoderConfig(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=16),
    "vq-f4": AutoencoderConfig(kind="vq", ch=128, ch_mult=[1, 2, 4], num_res_blocks=2, z_channels=3, n_embed=8192),
}


def autoencoder_preset(name: str, **overrides) -> AutoencoderConfig:
    if name not in AUTOENCODER_PRESETS:
        raise KeyError(f"unknown autoencoder preset {name!r}; choose from {sorted(AUTOENCODER_PRESETS)}")
    return AUTOENCODER_PRESETS[name].model_copy(update=overrides, deep=True)


# ---------------------------------------------------------------------------------------------------------------
# The latent scale: the one place autoencoder latents enter and leave diffusion space
# ---------------------------------------------------------------------------------------------------------------


def scale_latents(z: torch.Tensor, scale: float, shift: float = 0.0) -> torch.Tensor:
    """Autoencoder latents -> diffusion space: (z − shift)·scale (SD-1: scale 0.18215, shift 0; SD3 has a shift)."""
    return (z - shift) * scale


def unscale_latents(z: torch.Tensor, scale: float, shift: float = 0.0) -> torch.Tensor:
    """Diffusion space -> autoencoder latents: z/scale + shift (inverse of `scale_latents`)."""
    return z / scale + shift


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------

_EPS = 1e-6  # GroupNorm eps of the LDM/diffusers VAE


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3 → GroupNorm → SiLU → conv3×3, plus a 1×1 shortcut when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=_EPS)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (the VAE's mid block), with a residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=_EPS)
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ch, ch)
        self.v = nn.Linear(ch, ch)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.q(t), self.k(t), self.v(t)
        # one head of width C; SDPA picks the fused kernel for the device
        o = attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)  # (B, HW, C)
        o = self.proj_out(o).transpose(1, 2).reshape(b, c, h, w)
        return x + o


class Downsample(nn.Module):
    """Stride-2 conv3×3 with asymmetric zero padding (right/bottom), as in LDM and diffusers' VAE."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then conv3×3."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _run(block: nn.Module, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """block(x), recomputed in the backward pass instead of stored when `checkpointed` (and grads are on)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, attention: bool, checkpointed: bool = False):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups) if attention else None
        self.block_2 = ResnetBlock(ch, ch, groups)
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _run(self.block_1, x, self.checkpointed)
        if self.attn_1 is not None:
            x = _run(self.attn_1, x, self.checkpointed)
        return _run(self.block_2, x, self.checkpointed)


class Level(nn.Module):
    """One resolution level: residual blocks, then an optional resampler."""

    def __init__(
        self,
        blocks: list[ResnetBlock],
        downsample: nn.Module | None = None,
        upsample: nn.Module | None = None,
        checkpointed: bool = False,
    ):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample
        self.upsample = upsample
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = _run(blk, x, self.checkpointed)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


# ---------------------------------------------------------------------------------------------------------------
# Encoder, decoder, posterior
# ---------------------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        g, ckpt = cfg.norm_groups, cfg.gradient_checkpointing
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        levels, prev = [], widths[0]
        for i, w in enumerate(widths):
            blocks = [ResnetBlock(prev if j == 0 else w, w, g) for j in range(cfg.num_res_blocks)]
            last = i == len(widths) - 1
            levels.append(Level(blocks, downsample=None if last else Downsample(w), checkpointed=ckpt))
            prev = w
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(widths[-1], g, cfg.mid_attention, ckpt)
        self.norm_out = nn.GroupNorm(g, widths[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)  # (B, ch·mult_i, H/2^i, W/2^i)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.ch * m for m in reversed(cfg.ch_mult)]  # application order: deepest level first
        g, ckpt = cfg.norm_groups, cfg.gradient_checkpointing
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        self.mid = MidBlock(widths[0], g, cfg.mid_attention, ckpt)
        levels, prev = [], widths[0]
        for i, w in enumerate(widths):
            blocks = [ResnetBlock(prev if j == 0 else w, w, g) for j in range(cfg.num_res_blocks + 1)]
            last = i == len(widths) - 1
            levels.append(Level(blocks, upsample=None if last else Upsample(w), checkpointed=ckpt))
            prev = w
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(g, widths[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch·mult_-1, h, w)
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, h·f, w·f)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), from moments (B, 2C, h, w); logvar clamped to [−30, 20]."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) summed over latent dims, per sample: (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


@dataclass
class AutoencoderOutput:
    reconstruction: torch.Tensor
    """(B, 3, H, W) decoded image."""
    reg_loss: torch.Tensor
    """Scalar regularizer: KL summed over latent dims, mean over batch ("kl"), or codebook + commitment ("vq")."""
    reg_kind: str
    posterior: DiagonalGaussian | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra detached numbers to log (VQ: codebook usage and perplexity)."""


class AutoencoderKL(nn.Module):
    """Encoder → diagonal Gaussian posterior → decoder."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        if config.kind != "kl":
            raise ValueError("AutoencoderKL needs config.kind == 'kl'; use build_autoencoder for VQ")
        self.config = config
        z = config.z_channels
        self.encoder = Encoder(config, 2 * z)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if config.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        moments = self.encoder(x)  # (B, 2z, h, w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> AutoencoderOutput:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        recon = self.decode(z)
        kl = posterior.kl().mean()
        return AutoencoderOutput(recon, kl, "kl", posterior)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's final conv weight, where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    # latent scale: applied once, here, for everything that encodes into or decodes out of diffusion space
    def encode_latents(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        post = self.encode(x)
        z = post.sample(generator) if sample else post.mode()
        return scale_latents(z, self.config.scaling_factor, self.config.shift_factor)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(unscale_latents(z, self.config.scaling_factor, self.config.shift_factor))


# ---------------------------------------------------------------------------------------------------------------
# The VQ-regularized variant (the seed's ablation)
# ---------------------------------------------------------------------------------------------------------------


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantization with a straight-through estimator (van den Oord et al. 2017).

    loss = β·‖sg[e] − z‖² (commitment, trains the encoder) + ‖e − sg[z]‖² (codebook). The gradient of the
    reconstruction reaches the encoder unchanged through z_q = z + sg[e − z].
    """

    def __init__(self, n_embed: int, dim: int, beta: float):
        super().__init__()
        self.n_embed, self.dim, self.beta = n_embed, dim, beta
        self.embedding = nn.Embedding(n_embed, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (BHW, C)
        e = self.embedding.weight  # (K, C)
        # ‖z − e‖² = ‖z‖² + ‖e‖² − 2 z·e, computed in fp32 for a stable argmin
        d = flat.float().pow(2).sum(1, keepdim=True) + e.float().pow(2).sum(1) - 2.0 * flat.float() @ e.float().t()
        idx = d.argmin(dim=1)  # (BHW,)
        zq = self.embedding(idx).view(b, h, w, c).permute(0, 3, 1, 2).to(z.dtype)
        loss = self.beta * F.mse_loss(z, zq.detach()) + F.mse_loss(zq, z.detach())
        zq = z + (zq - z).detach()  # straight-through
        counts = torch.bincount(idx, minlength=self.n_embed).float()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        stats = {"codebook_usage": (counts > 0).float().mean(), "perplexity": perplexity}
        return zq, loss, {k: v.detach() for k, v in stats.items()}


class VQModel(nn.Module):
    """Encoder → quant_conv → codebook → post_quant_conv → decoder; trained by the same trainer as the KL model."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        if config.kind != "vq":
            raise ValueError("VQModel needs config.kind == 'vq'")
        self.config = config
        z = config.z_channels
        self.encoder = Encoder(config, z)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(z, z, 1) if config.use_quant_conv else None
        self.quantize = VectorQuantizer(config.n_embed, z, config.vq_beta)
        self.post_quant_conv = nn.Conv2d(z, z, 1) if config.use_post_quant_conv else None

    def encode_pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def decode(self, zq: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            zq = self.post_quant_conv(zq)
        return self.decoder(zq)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> AutoencoderOutput:
        zq, loss, stats = self.quantize(self.encode_pre_quant(x))
        return AutoencoderOutput(self.decode(zq), loss, "vq", None, stats)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def encode_latents(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        zq, _, _ = self.quantize(self.encode_pre_quant(x))
        return scale_latents(zq, self.config.scaling_factor, self.config.shift_factor)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(unscale_latents(z, self.config.scaling_factor, self.config.shift_factor))


Autoencoder = AutoencoderKL | VQModel


def build_autoencoder(config: AutoencoderConfig) -> AutoencoderKL | VQModel:
    return AutoencoderKL(config) if config.kind == "kl" else VQModel(config)
