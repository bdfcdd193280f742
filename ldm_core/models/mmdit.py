"""The MMDiT joint-attention denoiser of Stable Diffusion 3 (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis", §4 and Fig. 2).

    x (B, C, H, W) -> patches + 2-D sin-cos positions      -> image tokens (B, N, D), N = HW / p^2
    context (B, L, D_ctx) -> Linear                       -> text tokens  (B, L, D)
    t (B,) -> sinusoidal features -> MLP  +  pooled text (B, D_pool) -> MLP  = c (B, D)
      -> depth x JointBlock: each stream its own adaLN-Zero (from c), QKV and MLP; ONE attention over the
         concatenated [image, text] sequence (padding tokens masked out as keys)
      -> adaLN-continuous norm, Linear, unpatchify -> (B, C_out, H, W)

The layer layout, the normalisation epsilons, the timestep features and the cropped positional grid are those of
diffusers' ``SD3Transformer2DModel`` (without SD3.5's dual-attention layers), so ``ldm_core.interop`` converts
weights both ways, one tensor to one tensor, with identical outputs. Names follow the SD3 reference code
(x_embedder, t_embedder, y_embedder, context_embedder, joint_blocks, final_layer).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm_core.config import StrictModel
from ldm_core.models.attention import attention
from ldm_core.models.embeddings import MAX_PERIOD, TimestepEmbedder
from ldm_core.models.fused_projections import fuse_on_load
from ldm_core.models.text_mask import has_padding

TIME_FREQ_DIM = 256  # sinusoidal timestep features fed to the time MLP (DiT's and SD3's frequency_embedding_size)
MLP_RATIO = 4  # hidden width of every MLP = 4 x hidden_size (DiT, SD3)
NORM_EPS = 1e-6  # every LayerNorm and QK RMSNorm of SD3 (diffusers hard-codes it too)


# ---------------------------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------------------------


class MMDiTConfig(StrictModel):
    """Shape of the MMDiT. The defaults are SD3-medium's transformer (see MMDIT_PRESETS for its size)."""

    kind: Literal["mmdit"] = "mmdit"
    """Type tag of the denoiser family (the UNet's is "unet"): a checkpoint's config says which network to build."""

    in_channels: int = Field(16, ge=1)
    """Channels of the noisy latent x (the autoencoder's latent channels; SD3: 16)."""

    out_channels: int = Field(16, ge=1)
    """Channels of the prediction (noise, v or velocity: same shape as x)."""

    patch_size: int = Field(2, ge=1)
    """Side of the square latent patches that become tokens; latent sides must be divisible by it."""

    hidden_size: int = Field(1536, ge=4)
    """Width D of both streams' tokens and of the conditioning vector. A multiple of 4: the 2-D sin-cos positions
    give each axis half the channels, as sin/cos pairs."""

    depth: int = Field(24, ge=1)
    """Number of joint blocks (SD3 ties it to the width: depth d, d heads of 64 channels)."""

    num_heads: int = Field(24, ge=1)
    """Attention heads; hidden_size / num_heads channels each."""

    context_dim: int = Field(4096, ge=1)
    """Width of the text tokens (SD3: 4096, CLIP-L/G and T5 features padded to T5's width; all-MiniLM-L6-v2: 384)."""

    pooled_projection_dim: int | None = Field(2048, ge=1)
    """Width of the pooled text vector that joins the timestep in the modulation (SD3: 2048, the pooled CLIP-L and
    CLIP-G outputs). None = context_dim: the model may then pool the tokens itself when no vector is given."""

    sample_size: int = Field(128, ge=1)
    """Latent side the model is designed for (SD3: 128, i.e. 1024 px). It sets the spacing of the positional grid
    (sample_size / patch_size patches span that many position units), so it is part of the network."""

    pos_embed_max_size: int = Field(192, ge=1)
    """Side, in patches, of the precomputed positional grid; inputs use its centre crop, so latents up to
    patch_size x pos_embed_max_size per side work (SD3-medium: 192)."""

    qk_norm: Literal["rms_norm"] | None = None
    """RMSNorm on every head's queries and keys before the attention (SD3.5), which keeps attention logits from
    growing in long or high-lr training; None for SD3."""

    gradient_checkpointing: bool = False
    """Recompute each joint block in the backward pass instead of storing its activations."""

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        """``{"preset": "tiny", "depth": 2}`` starts from a named preset and overrides fields."""
        if not isinstance(data, dict) or "preset" not in data:
            return data
        data = dict(data)
        name = data.pop("preset")
        if name not in MMDIT_PRESETS:
            raise ValueError(f"unknown MMDiT preset {name!r}; choose from {sorted(MMDIT_PRESETS)}")
        return {**MMDIT_PRESETS[name].model_dump(), **data}

    @model_validator(mode="after")
    def _check_shapes(self) -> MMDiTConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of 4 (2-D sin-cos positions)")
        if self.sample_size % self.patch_size:
            raise ValueError(f"sample_size={self.sample_size} is not divisible by patch_size={self.patch_size}")
        if self.pos_embed_max_size < self.sample_size // self.patch_size:
            raise ValueError(
                f"pos_embed_max_size={self.pos_embed_max_size} patches does not cover sample_size="
                f"{self.sample_size} at patch_size={self.patch_size}"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text vector the model takes."""
        return self.context_dim if self.pooled_projection_dim is None else self.pooled_projection_dim


MMDIT_PRESETS: dict[str, MMDiTConfig] = {
    # CPU scale: 8x8x4 latents (16 patches, up to 16x16 latents), MiniLM text tokens (384) that the model pools
    # itself. 4 blocks of width 96: a training step takes fewer FLOPs than the tiny UNet's (ldm_core.flops).
    "tiny": MMDiTConfig(
        in_channels=4,
        out_channels=4,
        patch_size=2,
        hidden_size=96,
        depth=4,
        num_heads=4,
        context_dim=384,
        pooled_projection_dim=None,
        sample_size=8,
        pos_embed_max_size=8,
    ),
    # DiT-B/2 size (Peebles & Xie 2023) as a text-conditioned MMDiT on SD-1 latents (32x32x4 at 256 px, grid up
    # to 512 px) with CLIP ViT-L/14 tokens.
    "dit-b": MMDiTConfig(
        in_channels=4,
        out_channels=4,
        patch_size=2,
        hidden_size=768,
        depth=12,
        num_heads=12,
        context_dim=768,
        pooled_projection_dim=None,
        sample_size=32,
        pos_embed_max_size=32,
    ),
    # Stable Diffusion 3 medium's transformer: 2,028,328,000 parameters (the "2B"), counted on the meta device
    # (tests/core/test_mmdit.py), the same as diffusers' SD3Transformer2DModel with this config.
    "sd3-medium": MMDiTConfig(
        in_channels=16,
        out_channels=16,
        patch_size=2,
        hidden_size=1536,
        depth=24,
        num_heads=24,
        context_dim=4096,
        pooled_projection_dim=2048,
        sample_size=128,
        pos_embed_max_size=192,
    ),
}
"""Named MMDiT shapes. Derive a variant with validation: MMDiTConfig(preset="tiny", depth=2)."""


# ---------------------------------------------------------------------------------------------------------------
# Embedding layers
# ---------------------------------------------------------------------------------------------------------------


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """[sin(p w_k), cos(p w_k)], w_k = 10000^(-k/(dim/2)), in float64 as MAE, DiT and diffusers. (M,) -> (M, dim)."""
    omega = 1.0 / MAX_PERIOD ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    out = pos.double()[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, base_size: int) -> Tensor:
    """2-D sin-cos positions of a grid_size x grid_size grid, row-major: (grid_size^2, dim), fp32.

    Cell (i, j) sits at (x, y) = (j, i) * base_size / grid_size, so a base_size-patch input centred in the grid spans
    base_size units whatever the grid size (diffusers' PatchEmbed with interpolation_scale 1). The first half of the
    channels encodes x (the column), the second half y (the row), the MAE/DiT convention.
    """
    pos = torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size)  # fp32, as diffusers rounds it
    y, x = torch.meshgrid(pos, pos, indexing="ij")  # (grid, grid) each
    emb = torch.cat([sincos_1d(dim // 2, x.reshape(-1)), sincos_1d(dim // 2, y.reshape(-1))], dim=1)
    return emb.float()


class PatchEmbedder(nn.Module):
    """Non-overlapping p x p patches -> Linear (a stride-p conv) -> tokens, plus the centre crop of a fixed
    sin-cos grid: (B, C, H, W) -> (B, HW/p^2, D).

    The grid is a persistent buffer, as in SD3 checkpoints, so a converted checkpoint keeps its exact values."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.max_size = cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        grid = sincos_pos_embed_2d(cfg.hidden_size, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)
        self.register_buffer("pos_embed", grid[None])  # (1, M*M, D)

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """The centre h x w of the grid (h, w in patches): (1, h*w, D)."""
        if h > self.max_size or w > self.max_size:
            raise ValueError(
                f"{h}x{w} patches exceed pos_embed_max_size={self.max_size} (latents up to "
                f"{self.max_size * self.patch_size} per side)"
            )
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        grid = self.pos_embed.view(1, self.max_size, self.max_size, -1)  # (1, M, M, D)
        return grid[:, top : top + h, left : left + w].reshape(1, h * w, -1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)  # (B, D, H/p, W/p)
        pos = self.cropped_pos_embed(*h.shape[-2:])
        return h.flatten(2).transpose(1, 2) + pos.to(h.dtype)  # (B, N, D)


class VectorEmbedder(nn.Module):
    """MLP on the pooled text vector, added to the timestep embedding to form the conditioning c (SD3's y)."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(y)))  # (B, D)


def masked_mean(context: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of the real tokens: (B, L, D), (B, L) bool -> (B, D). A sample without real tokens pools to zeros."""
    if mask is None:
        return context.mean(dim=1)
    weights = mask.to(context.dtype)[..., None]  # (B, L, 1)
    return (context * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Joint block: two streams, one attention
# ---------------------------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, N, D) normalised, then scaled and shifted per sample by (B, D) vectors from c."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])  # one fused kernel for x * (1 + scale) + shift


def gated_residual(x: Tensor, gate: Tensor, update: Tensor) -> Tensor:
    """adaLN-Zero's residual x + gate * update, gate (B, D) per sample, in one fused kernel."""
    return torch.addcmul(x, gate[:, None], update)


class Mlp(nn.Module):
    """Linear, tanh-approximated GELU, Linear (the MLP of ViT, DiT and SD3)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class StreamBlock(nn.Module):
    """One modality's half of a joint block: its own adaLN-Zero modulation, QKV (+ QK norm), output projection and
    MLP (the SD3 reference code's DismantledBlock). It runs in two halves around the shared attention.

    The query, key and value projections are one Linear to 3·D (rows: q, k, v), so a stream makes one matmul, not
    three; checkpoints with separate to_q/to_k/to_v still load (the interop splits it for diffusers).

    `pre_only` (the text stream of the last block): the stream only supplies keys and values for the image tokens,
    so there is no output projection and no MLP, and the modulation is adaLN-continuous (scale, shift; no gates).
    Its queries are still computed, as in SD3 and diffusers: the weights exist in SD3 checkpoints, and keeping
    them in the graph (with zero gradient) lets DDP run without find_unused_parameters.
    """

    def __init__(self, dim: int, heads: int, qk_norm: str | None, pre_only: bool):
        super().__init__()
        self.heads = heads
        self.pre_only = pre_only
        self.modulation = nn.Linear(dim, (2 if pre_only else 6) * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.qkv = nn.Linear(dim, 3 * dim)
        # normalised per head, over its channels; a learnt gain per channel, as in SD3.5
        self.norm_q = nn.RMSNorm(dim // heads, eps=NORM_EPS) if qk_norm == "rms_norm" else None
        self.norm_k = nn.RMSNorm(dim // heads, eps=NORM_EPS) if qk_norm == "rms_norm" else None
        if not pre_only:
            self.to_out = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
            self.mlp = Mlp(dim, MLP_RATIO * dim)
        self.register_load_state_dict_pre_hook(fuse_on_load)

    def pre_attention(self, x: Tensor, silu_c: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """x (B, N, D), silu_c = SiLU(c) (B, D) -> qkv (B, N, 3, heads, D/heads) and the modulation
        post_attention uses."""
        B, N, D = x.shape
        if self.pre_only:
            scale, shift = self.modulation(silu_c).chunk(2, dim=-1)  # 2 x (B, D); adaLN-continuous's order
            mods: tuple[Tensor, ...] = ()
        else:
            shift, scale, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(silu_c).chunk(6, dim=-1)
            mods = (gate_msa, shift_mlp, scale_mlp, gate_mlp)
        qkv = self.qkv(modulate(self.norm1(x), shift, scale)).view(B, N, 3, self.heads, D // self.heads)
        if self.norm_q is not None:
            q, k, v = qkv.unbind(2)  # (B, N, heads, D/heads) each
            qkv = torch.stack([self.norm_q(q), self.norm_k(k), v], dim=2)
        return qkv, mods

    def post_attention(self, x: Tensor, attn: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        """Gated residual updates: x + gate·Out(attn), then x + gate·MLP(adaLN(x)). attn (B, N, D)."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        # attn is a slice of the joint sequence; one explicit copy lets the Linear run as a single addmm
        x = gated_residual(x, gate_msa, self.to_out(attn.contiguous()))
        return gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class JointBlock(nn.Module):
    """MM-DiT block: both streams project to queries, keys and values with their own weights; one attention runs
    over the concatenated [image, text] sequence, so each modality attends to both; each stream then updates its
    own tokens. The last block (context_pre_only) updates only the image tokens."""

    def __init__(self, dim: int, heads: int, qk_norm: str | None, context_pre_only: bool):
        super().__init__()
        self.x_block = StreamBlock(dim, heads, qk_norm, pre_only=False)
        self.context_block = StreamBlock(dim, heads, qk_norm, pre_only=context_pre_only)

    def forward(
        self, x: Tensor, context: Tensor, silu_c: Tensor, key_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D) image tokens, context (B, L, D) text tokens, silu_c = SiLU(c) (B, D); key_mask
        (B, 1, 1, N + L) bool, True = may be attended to, or None when every token is real. Returns the updated
        (x, context); context is None after the last block."""
        B, N, D = x.shape
        qkv_x, x_mods = self.x_block.pre_attention(x, silu_c)
        qkv_c, c_mods = self.context_block.pre_attention(context, silu_c)
        # one concatenation for q, k and v of both streams; SDPA reads the strided views in place
        qkv = torch.cat([qkv_x, qkv_c], dim=1)  # (B, N + L, 3, heads, D/heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N + L, D/heads) each
        out = attention(q, k, v, attn_mask=key_mask)  # (B, heads, N + L, D/heads)
        out = out.transpose(1, 2).reshape(B, -1, D)  # (B, N + L, D)
        x = self.x_block.post_attention(x, out[:, :N], x_mods)
        if self.context_block.pre_only:
            return x, None
        return x, self.context_block.post_attention(context, out[:, N:], c_mods)


class FinalLayer(nn.Module):
    """adaLN-continuous LayerNorm (scale and shift from c), then a Linear to p·p·C_out values per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.modulation = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, silu_c: Tensor) -> Tensor:
        """x (B, N, D), silu_c = SiLU(c) (B, D)."""
        scale, shift = self.modulation(silu_c).chunk(2, dim=-1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C_out)


# ---------------------------------------------------------------------------------------------------------------
# The MMDiT
# ---------------------------------------------------------------------------------------------------------------


class MMDiT(nn.Module):
    """eps/v/velocity predictor: forward(x (B,C,H,W), t, context (B,L,D), context_mask, pooled) -> (B,C_out,H,W)."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        D = config.hidden_size
        self.x_embedder = PatchEmbedder(config)
        self.t_embedder = TimestepEmbedder(TIME_FREQ_DIM, D)
        self.y_embedder = VectorEmbedder(config.pooled_dim, D)
        self.context_embedder = nn.Linear(config.context_dim, D)
        self.joint_blocks = nn.ModuleList(
            JointBlock(D, config.num_heads, config.qk_norm, context_pre_only=i == config.depth - 1)
            for i in range(config.depth)
        )
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears (the patch conv as the linear it is), N(0, 0.02) for the
        conditioning MLPs, and zeros for every modulation and the output layer. The zero gates make each block the
        identity at the start (adaLN-Zero) and the zero output layer starts the prediction at 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        for embedder in (self.t_embedder, self.y_embedder):
            nn.init.normal_(embedder.fc1.weight, std=0.02)
            nn.init.normal_(embedder.fc2.weight, std=0.02)
        for block in self.joint_blocks:
            for stream in (block.x_block, block.context_block):
                nn.init.zeros_(stream.modulation.weight)
                nn.init.zeros_(stream.modulation.bias)
        for layer in (self.final_layer.modulation, self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        """(B, h*w, p*p*C) tokens, each a p x p x C patch (row, column, channel) -> (B, C, h*p, w*p)."""
        p, C = self.config.patch_size, self.config.out_channels
        x = x.view(x.shape[0], h, w, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], C, h * p, w * p)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        context: Tensor,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, H, W) noisy latents, H and W multiples of patch_size; t (B,) model time, or one time for all
        (0-d tensor / float), on a 0..1000 scale like the UNet's; context (B, L, context_dim) text tokens;
        context_mask (B, L) bool, True = real token (padding is never attended to and has no effect on the output);
        pooled (B, pooled_dim) pooled text vector. Without `pooled` the model pools the text itself: the mean of
        the real tokens of `context` (zeros for a sample without any), which needs pooled_dim == context_dim.
        Returns (B, out_channels, H, W)."""
        B, _, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"latent sides {H}x{W} are not multiples of patch_size={p}")
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or have shape ({B},), got {tuple(t.shape)}")
        key_mask = None
        if context_mask is not None:
            context_mask = context_mask.to(device=x.device, dtype=torch.bool)
        if context_mask is not None and has_padding(context_mask):
            # zero the padding: whatever sits there (even inf/NaN) then cannot leak through a zero attention weight
            context = context.masked_fill(~context_mask[..., None], 0.0)
            image_keys = torch.ones(B, H * W // p**2, dtype=torch.bool, device=x.device)
            key_mask = torch.cat([image_keys, context_mask], dim=1)[:, None, None, :]  # (B, 1, 1, N + L)
        if pooled is None:
            if self.config.pooled_dim != self.config.context_dim:
                raise ValueError(
                    f"no pooled text vector given, and the tokens' width {self.config.context_dim} "
                    f"cannot stand in for one of width {self.config.pooled_dim} "
                    f"(pooled_projection_dim): pass `pooled`"
                )
            pooled = masked_mean(context, context_mask)  # (B, context_dim)

        c = self.t_embedder(t).to(x.dtype) + self.y_embedder(pooled.to(x.dtype))  # (B, D)
        silu_c = F.silu(c)  # every modulation reads SiLU(c): computed once, not once per layer
        h = self.x_embedder(x)  # (B, N, D)
        ctx: Tensor | None = self.context_embedder(context)  # (B, L, D)
        for block in self.joint_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h, ctx = checkpoint(block, h, ctx, silu_c, key_mask, use_reentrant=False)
            else:
                h, ctx = block(h, ctx, silu_c, key_mask)
        h = self.final_layer(h, silu_c)  # (B, N, p*p*C_out)
        return self.unpatchify(h, H // p, W // p)  # (B, C_out, H, W)


__all__ = ["MMDIT_PRESETS", "MMDiT", "MMDiTConfig", "sincos_pos_embed_2d"]
