"""The text-conditioned UNet denoiser of latent diffusion (Rombach et al. 2022, §3.3; the Stable Diffusion 1/2 UNet).

    x (B, C, H, W), t (B,), text tokens (B, L, D)
      -> conv_in -> down levels [ResBlock (+ SpatialTransformer)] x num_res_blocks, Downsample
      -> mid [ResBlock, SpatialTransformer, ResBlock]
      -> up levels [concat skip, ResBlock (+ SpatialTransformer)] x (num_res_blocks + 1), Upsample
      -> GroupNorm, SiLU, conv_out -> (B, C_out, H, W)

The time t enters every residual block through a sinusoidal embedding and an MLP; the text enters every spatial
transformer through cross-attention (image features are the queries, text tokens the keys and values). The layout,
the normalisation epsilons and the timestep features are those of the diffusers ``UNet2DConditionModel`` with
SD-1/2 settings, so ``ldm_core.interop`` converts weights both ways with identical outputs.

One module on purpose, divided by banners like DiT's ``models.py``: the config, the blocks and the model read top
to bottom in the order the forward pass uses them; split, a reader would follow every block into another file. The
timestep embedding, which the MMDiT uses too, lives in `embeddings`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm_core.config import StrictModel
from ldm_core.models.attention import attention
from ldm_core.models.embeddings import TimestepEmbedder
from ldm_core.models.fused_projections import fuse_on_load
from ldm_core.models.text_mask import has_padding

TIME_EMBED_MULT = 4  # width of the time embedding = 4 x model_channels (DDPM, LDM, SD)
FF_MULT = 4  # GEGLU hidden width = 4 x channels
RES_NORM_EPS = 1e-5  # GroupNorm eps in residual blocks and before conv_out (diffusers' norm_eps for SD)
TRANSFORMER_GROUP_NORM_EPS = 1e-6  # GroupNorm eps before proj_in (LDM's Normalize; fixed in diffusers too)
LAYER_NORM_EPS = 1e-5  # LayerNorm eps inside the transformer blocks


# ---------------------------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_HEADS = 8  # SD-1's head count, used when neither num_heads nor num_head_channels is given


class UNetConfig(StrictModel):
    """Shape of the text-conditioned UNet. Level i works at resolution H / 2**i with model_channels·channel_mult[i]
    channels; the defaults are the SD-1 UNet (860 M parameters)."""

    kind: Literal["unet"] = "unet"
    """Type tag of the denoiser family: a checkpoint's config says which network to build (the MMDiT's tag is
    "mmdit")."""

    in_channels: int = Field(4, ge=1)
    """Channels of the noisy latent x (the autoencoder's latent channels)."""

    out_channels: int = Field(4, ge=1)
    """Channels of the prediction (noise, v or velocity: same shape as x)."""

    model_channels: int = Field(320, ge=2)
    """Width of level 0; also the size of the sinusoidal timestep features (must be even)."""

    channel_mult: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 2, 4, 4], min_length=1)
    """Width multiplier per level; len(channel_mult) levels, so the input side must be divisible by
    2**(len-1) for the skips to line up without resizing (other sizes still work: the upsampler follows the skip)."""

    num_res_blocks: int = Field(2, ge=1)
    """Residual blocks per level on the way down (the way up has one more, to consume the downsampler's skip)."""

    attention_levels: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0, 1, 2])
    """Levels (0 = full resolution) whose residual blocks are each followed by a spatial transformer. The mid
    block always has one. SD-1: [0, 1, 2] (64, 32, 16 latent pixels at 512 px)."""

    num_heads: int | None = Field(None, ge=1)
    """Attention heads at every level (SD-1: 8). At most one of num_heads / num_head_channels is set; with
    neither, 8 heads."""

    num_head_channels: int | None = Field(None, ge=1)
    """Channels per head instead of a fixed head count, so deeper levels get more heads (SD-2: 64)."""

    transformer_depth: int = Field(1, ge=1)
    """BasicTransformerBlocks inside each spatial transformer."""

    context_dim: int = Field(768, ge=1)
    """Width of the text tokens (CLIP ViT-L/14: 768; all-MiniLM-L6-v2: 384)."""

    norm_groups: int = Field(32, ge=1)
    """GroupNorm groups; every level's width must be divisible by it."""

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout inside the residual blocks (before their second conv). The transformers have none, as in SD."""

    use_linear_projection: bool = False
    """proj_in/proj_out of the spatial transformers as Linear on tokens (SD-2) instead of 1x1 convs (SD-1). The
    two compute the same function; the flag fixes the parameter layout, so checkpoints of either kind load."""

    gradient_checkpointing: bool = False
    """Recompute residual blocks and transformers in the backward pass instead of storing their activations."""

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        """``{"preset": "tiny", "model_channels": 64}`` starts from a named preset and overrides fields; with no
        head rule at all, 8 heads."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "preset" in data:
            name = data.pop("preset")
            if name not in UNET_PRESETS:
                raise ValueError(f"unknown UNet preset {name!r}; choose from {sorted(UNET_PRESETS)}")
            base = UNET_PRESETS[name].model_dump()
            if data.get("num_head_channels") is not None or data.get("num_heads") is not None:
                base.pop("num_heads"), base.pop("num_head_channels")  # choosing one head rule replaces the other
            data = {**base, **data}
        if data.get("num_heads") is None and data.get("num_head_channels") is None:
            data["num_heads"] = DEFAULT_HEADS
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> UNetConfig:
        levels = len(self.channel_mult)
        if self.model_channels % 2:
            raise ValueError(f"model_channels={self.model_channels} must be even (sin/cos timestep features)")
        bad = [lv for lv in self.attention_levels if lv >= levels]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range for {levels} levels (channel_mult)")
        if len(set(self.attention_levels)) != len(self.attention_levels):
            raise ValueError(f"attention_levels {self.attention_levels} has duplicates")
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError("set at most one of num_heads and num_head_channels")
        for width in self.level_channels():
            if width % self.norm_groups:
                raise ValueError(
                    f"width {width} (model_channels x channel_mult) is not divisible by norm_groups={self.norm_groups}"
                )
        # every level with a transformer, and the mid block (at the last level's width), must split into heads
        for width in {self.level_channels()[lv] for lv in self.attention_levels} | {self.level_channels()[-1]}:
            if self.num_heads is not None and width % self.num_heads:
                raise ValueError(f"width {width} is not divisible by num_heads={self.num_heads}")
            if self.num_head_channels is not None and width % self.num_head_channels:
                raise ValueError(f"width {width} is not divisible by num_head_channels={self.num_head_channels}")
        return self

    def level_channels(self) -> list[int]:
        """Width of each level: model_channels x channel_mult[i]."""
        return [self.model_channels * m for m in self.channel_mult]

    def heads_at(self, width: int) -> int:
        """Number of attention heads of a transformer working on `width` channels."""
        return self.num_heads if self.num_heads is not None else width // self.num_head_channels

    @property
    def time_embed_dim(self) -> int:
        return TIME_EMBED_MULT * self.model_channels


UNET_PRESETS: dict[str, UNetConfig] = {
    # CPU scale: 8x8x4 latents, MiniLM text tokens (384). Two levels (8x8, 4x4); transformers at 4x4 and in the
    # mid block (transformers at 8x8 too would make every step markedly slower).
    "tiny": UNetConfig(
        model_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_levels=[1],
        num_heads=4,
        context_dim=384,
        norm_groups=8,
    ),
    # Stable Diffusion 1.x (64x64x4 latents at 512 px, CLIP ViT-L/14 tokens).
    "sd1": UNetConfig(
        model_channels=320,
        channel_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attention_levels=[0, 1, 2],
        num_heads=8,
        context_dim=768,
        norm_groups=32,
    ),
}
"""Named UNet shapes. Derive a variant with validation: UNetConfig(**{**UNET_PRESETS["tiny"].to_dict(), ...})."""


# ---------------------------------------------------------------------------------------------------------------
# Residual block, down- and upsampling
# ---------------------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + projected time embedding, GroupNorm-SiLU-dropout-conv, + (1x1-projected) input."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=RES_NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=RES_NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 conv only where the width changes, so the residual path stays the identity elsewhere
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, silu_temb: Tensor) -> Tensor:
        """x (B, C_in, H, W), silu_temb = SiLU(time embedding) (B, time_dim) -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.time_proj(silu_temb)[:, :, None, None]  # time shifts every channel: (B, C_out, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to the skip's size, for sides not divisible by 2) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # (B, C, *size)


# ---------------------------------------------------------------------------------------------------------------
# Spatial transformer: self-attention over pixels, cross-attention to the text, GEGLU feed-forward
# ---------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head scaled dot-product attention; keys/values from `context` (cross, when context_dim is given) or
    from x itself (self).

    The projections that read the same input are one Linear (self: q, k, v -> `qkv`; cross: k, v of the text ->
    `to_kv`), one matmul instead of three or two; checkpoints with separate to_q/to_k/to_v load into them
    (ldm_core.models.fused_projections), and the interop splits them for diffusers.
    """

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        # no biases on q/k/v, a bias on the output: the SD layout
        if context_dim is None:
            self.qkv = nn.Linear(query_dim, 3 * query_dim, bias=False)
        else:
            self.to_q = nn.Linear(query_dim, query_dim, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * query_dim, bias=False)
        self.to_out = nn.Linear(query_dim, query_dim)
        self.register_load_state_dict_pre_hook(fuse_on_load)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x (B, N, C); context (B, L, D) for a cross-attention, None for a self-attention; mask (B, L) bool,
        True = a real token -> (B, N, C)."""
        B, N, C = x.shape
        if context is None:
            # SDPA reads the strided views of the one projection in place
            q, k, v = self.qkv(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, C/h)
        else:
            q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, h, N, C/h)
            kv = self.to_kv(context).view(B, context.shape[1], 2, self.heads, -1)  # (B, L, 2, h, C/h)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, L, C/h) each
        attn_mask = has_keys = None
        if mask is not None:
            # A row with no real token would be all -inf (NaN after softmax). Such a sample attends to nothing:
            # its softmax runs over all keys to stay finite, and its output is zeroed below.
            has_keys = mask.any(dim=-1)  # (B,)
            attn_mask = (mask | ~has_keys[:, None])[:, None, None, :]  # (B, 1, 1, L), broadcast over heads, queries
        out = attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, C/h)
        if has_keys is not None:
            out = out.masked_fill(~has_keys[:, None, None, None], 0.0)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class FeedForward(nn.Module):
    """GEGLU MLP (Shazeer 2020): proj_out(a * gelu(g)), with (a, g) = proj_in(x) split in halves."""

    def __init__(self, dim: int, mult: int = FF_MULT):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)  # 2 x (B, N, mult*C)
        return self.proj_out(a * F.gelu(gate))


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm residual stack: self-attention, cross-attention to the text tokens, feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.self_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.cross_attn = Attention(dim, heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, added to the input.

    proj_out starts at zero, so at initialisation the whole transformer is the identity and the UNet starts as
    a plain residual network that learns how much to listen to the text (LDM's zero_module).
    """

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int, linear: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_GROUP_NORM_EPS)
        if linear:
            self.proj_in: nn.Module = nn.Linear(channels, channels)
            self.proj_out: nn.Module = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList(BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth))
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.linear:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, HW, C)
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        for block in self.blocks:
            h = block(h, context, context_mask)
        if self.linear:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        else:
            h = self.proj_out(h.reshape(B, H, W, C).permute(0, 3, 1, 2))  # (B, C, H, W)
        return x + h


# ---------------------------------------------------------------------------------------------------------------
# Levels of the UNet
# ---------------------------------------------------------------------------------------------------------------


def _call(module: nn.Module, *args: Tensor | None, checkpointed: bool) -> Tensor:
    """module(*args), recomputed in the backward pass instead of stored when `checkpointed` (and grads are on)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class DownLevel(nn.Module):
    """One resolution on the way down: num_res_blocks x [ResBlock (+ SpatialTransformer)], then Downsample."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, attention: bool, downsample: bool):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ResBlock(in_ch if i == 0 else out_ch, out_ch, cfg.time_embed_dim, cfg.norm_groups, cfg.dropout)
            for i in range(cfg.num_res_blocks)
        )
        self.transformers = nn.ModuleList(
            SpatialTransformer(
                out_ch,
                cfg.heads_at(out_ch),
                cfg.transformer_depth,
                cfg.context_dim,
                cfg.norm_groups,
                cfg.use_linear_projection,
            )
            for _ in range(cfg.num_res_blocks if attention else 0)
        )
        self.downsample = Downsample(out_ch) if downsample else None

    def forward(
        self,
        h: Tensor,
        silu_temb: Tensor,
        context: Tensor,
        context_mask: Tensor | None,
        skips: list[Tensor],
        checkpointed: bool,
    ) -> Tensor:
        """Runs the level and appends every intermediate feature map to `skips` for the way up."""
        for i, res in enumerate(self.res_blocks):
            h = _call(res, h, silu_temb, checkpointed=checkpointed)
            if self.transformers:
                h = _call(self.transformers[i], h, context, context_mask, checkpointed=checkpointed)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)  # (B, C, H/2, W/2)
            skips.append(h)
        return h


class MidBlock(nn.Module):
    """At the lowest resolution: ResBlock, SpatialTransformer, ResBlock."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        self.res1 = ResBlock(ch, ch, cfg.time_embed_dim, cfg.norm_groups, cfg.dropout)
        self.transformer = SpatialTransformer(
            ch, cfg.heads_at(ch), cfg.transformer_depth, cfg.context_dim, cfg.norm_groups, cfg.use_linear_projection
        )
        self.res2 = ResBlock(ch, ch, cfg.time_embed_dim, cfg.norm_groups, cfg.dropout)

    def forward(
        self, h: Tensor, silu_temb: Tensor, context: Tensor, context_mask: Tensor | None, checkpointed: bool
    ) -> Tensor:
        h = _call(self.res1, h, silu_temb, checkpointed=checkpointed)
        h = _call(self.transformer, h, context, context_mask, checkpointed=checkpointed)
        return _call(self.res2, h, silu_temb, checkpointed=checkpointed)


class UpLevel(nn.Module):
    """One resolution on the way up: (num_res_blocks + 1) x [concat a skip, ResBlock (+ SpatialTransformer)],
    then Upsample. `skip_channels` are the widths of the skips it consumes, in the order it pops them."""

    def __init__(
        self, in_ch: int, out_ch: int, skip_channels: list[int], cfg: UNetConfig, attention: bool, upsample: bool
    ):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ResBlock((in_ch if i == 0 else out_ch) + skip, out_ch, cfg.time_embed_dim, cfg.norm_groups, cfg.dropout)
            for i, skip in enumerate(skip_channels)
        )
        self.transformers = nn.ModuleList(
            SpatialTransformer(
                out_ch,
                cfg.heads_at(out_ch),
                cfg.transformer_depth,
                cfg.context_dim,
                cfg.norm_groups,
                cfg.use_linear_projection,
            )
            for _ in range(len(skip_channels) if attention else 0)
        )
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(
        self,
        h: Tensor,
        silu_temb: Tensor,
        context: Tensor,
        context_mask: Tensor | None,
        skips: list[Tensor],
        checkpointed: bool,
    ) -> Tensor:
        """Pops its skips (the latest first) from `skips`."""
        for i, res in enumerate(self.res_blocks):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            h = _call(res, h, silu_temb, checkpointed=checkpointed)
            if self.transformers:
                h = _call(self.transformers[i], h, context, context_mask, checkpointed=checkpointed)
        if self.upsample is not None:
            h = self.upsample(h, size=skips[-1].shape[-2:])  # to the next skip's size: (B, C, ~2H, ~2W)
        return h


# ---------------------------------------------------------------------------------------------------------------
# The UNet
# ---------------------------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """eps/v/velocity predictor: forward(x (B,C,H,W), t, context (B,L,D), context_mask (B,L) | None) -> (B,C,H,W)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        widths = config.level_channels()
        n = len(widths)

        self.time_embedder = TimestepEmbedder(config.model_channels, config.time_embed_dim)
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)

        # way down; record the width of every skip in the order they are pushed
        self.down = nn.ModuleList()
        skip_channels = [widths[0]]  # conv_in's output is the first skip
        in_ch = widths[0]
        for level, width in enumerate(widths):
            last = level == n - 1
            self.down.append(DownLevel(in_ch, width, config, level in config.attention_levels, downsample=not last))
            skip_channels += [width] * config.num_res_blocks + ([] if last else [width])
            in_ch = width

        self.mid = MidBlock(widths[-1], config)

        # way up, deepest level first, popping the skip widths as the forward pass pops the skips;
        # stored by level (self.up[0] is full resolution) so that down[i] and up[i] are the same resolution
        up: list[UpLevel] = []
        for level in reversed(range(n)):
            popped = [skip_channels.pop() for _ in range(config.num_res_blocks + 1)]
            up.append(
                UpLevel(in_ch, widths[level], popped, config, level in config.attention_levels, upsample=level > 0)
            )
            in_ch = widths[level]
        self.up = nn.ModuleList(reversed(up))

        self.norm_out = nn.GroupNorm(config.norm_groups, widths[0], eps=RES_NORM_EPS)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        context: Tensor,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, H, W) noisy latents; t (B,) model time, or one time for all (0-d tensor / float);
        context (B, L, D) text tokens; context_mask (B, L) bool, True = real token (padding gets no attention).
        pooled is ignored: the UNet reads the text only through cross-attention to the tokens; the argument is
        there so that every backbone takes the same call (see ldm_core.models.denoiser.Denoiser)."""
        B = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or have shape ({B},), got {tuple(t.shape)}")
        if context_mask is not None:
            context_mask = context_mask.to(device=x.device, dtype=torch.bool)
            if not has_padding(context_mask):
                context_mask = None
        ckpt = self.gradient_checkpointing

        # every residual block reads SiLU(temb): computed once, not once per block
        silu_temb = F.silu(self.time_embedder(t).to(x.dtype))  # (B, 4 * model_channels)
        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for level in self.down:
            h = level(h, silu_temb, context, context_mask, skips, ckpt)
        h = self.mid(h, silu_temb, context, context_mask, ckpt)  # (B, C_last, H / 2**(n-1), W / 2**(n-1))
        for level in reversed(self.up):
            h = level(h, silu_temb, context, context_mask, skips, ckpt)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)


__all__ = ["UNET_PRESETS", "UNet", "UNetConfig"]
