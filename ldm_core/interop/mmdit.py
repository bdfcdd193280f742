"""Our MMDiT <-> diffusers' SD3Transformer2DModel: a config mapping and an explicit, invertible key mapping.

The two networks have the same layers (SD3's layout), so converting is renaming state-dict keys, one tensor to one
tensor, the positional grid buffer included; the one exception is that each of our streams holds its query, key
and value projections as one fused ``qkv`` Linear, which is split into diffusers' three and stacked back exactly.
Settings diffusers allows but our MMDiT cannot represent (SD3.5's dual-attention layers, other QK norms, a caption
projection narrower or wider than the blocks) are refused with the field named, never approximated. diffusers'
SD3 attention takes no text mask and needs the pooled vector explicitly: ``ours(x, t, context, None, pooled)``
equals ``theirs(x, context, pooled, t)``.
"""

from __future__ import annotations

import re
from typing import Any

from ldm_core.interop.weights import check_same_keys, like
from ldm_core.models.fused_projections import unfuse
from ldm_core.models.mmdit import MMDiT, MMDiTConfig

# ---------------------------------------------------------------------------------------------------------------
# State-dict keys
# ---------------------------------------------------------------------------------------------------------------

# Whole-key renames outside the joint blocks.
_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "x_embedder.pos_embed": "pos_embed.pos_embed",
    "t_embedder.fc1": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.fc2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.fc1": "time_text_embed.text_embedder.linear_1",
    "y_embedder.fc2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.modulation": "norm_out.linear",
    "final_layer.linear": "proj_out",
}

# Inside a joint block: (stream, our layer) -> diffusers' layer. The image stream owns diffusers' plain attention
# projections, the text stream the "added" ones.
_STREAM = {
    ("x_block", "modulation"): "norm1.linear",
    ("x_block", "to_q"): "attn.to_q",
    ("x_block", "to_k"): "attn.to_k",
    ("x_block", "to_v"): "attn.to_v",
    ("x_block", "norm_q"): "attn.norm_q",
    ("x_block", "norm_k"): "attn.norm_k",
    ("x_block", "to_out"): "attn.to_out.0",
    ("x_block", "mlp.fc1"): "ff.net.0.proj",
    ("x_block", "mlp.fc2"): "ff.net.2",
    ("context_block", "modulation"): "norm1_context.linear",
    ("context_block", "to_q"): "attn.add_q_proj",
    ("context_block", "to_k"): "attn.add_k_proj",
    ("context_block", "to_v"): "attn.add_v_proj",
    ("context_block", "norm_q"): "attn.norm_added_q",
    ("context_block", "norm_k"): "attn.norm_added_k",
    ("context_block", "to_out"): "attn.to_add_out",
    ("context_block", "mlp.fc1"): "ff_context.net.0.proj",
    ("context_block", "mlp.fc2"): "ff_context.net.2",
}


def diffusers_key(key: str) -> str:
    """Our state-dict key -> diffusers' key."""
    if m := re.fullmatch(r"joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)\.(weight|bias)", key):
        i, stream, layer, kind = m.groups()
        if (stream, layer) in _STREAM:
            return f"transformer_blocks.{i}.{_STREAM[stream, layer]}.{kind}"
    elif key == "x_embedder.pos_embed":
        return _TOP[key]
    elif (m := re.fullmatch(r"(.+)\.(weight|bias)", key)) and m[1] in _TOP:
        return f"{_TOP[m[1]]}.{m[2]}"
    raise KeyError(f"no diffusers name for MMDiT parameter {key!r}")


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------


def config_from_diffusers(dcfg: Any) -> MMDiTConfig:
    """A diffusers SD3Transformer2DModel config (its `.config`) -> MMDiTConfig; ValueError names what we cannot
    represent. A pooled width equal to the token width becomes None (the model may pool its tokens itself)."""
    if tuple(dcfg.get("dual_attention_layers") or ()):
        raise ValueError(
            f"diffusers SD3Transformer2DModel.dual_attention_layers={dcfg['dual_attention_layers']!r} "
            f"is not supported (SD3.5's MMDiT-X second attention; our MMDiT is SD3's layout)"
        )
    if dcfg.get("qk_norm") not in (None, "rms_norm"):
        raise ValueError(
            f"diffusers SD3Transformer2DModel.qk_norm={dcfg['qk_norm']!r} is not supported (only None and 'rms_norm')"
        )
    if dcfg.get("pos_embed_max_size") is None:
        raise ValueError(
            "diffusers SD3Transformer2DModel.pos_embed_max_size=None is not supported (our positions "
            "are always a centre crop of a fixed grid, as in SD3)"
        )
    hidden = dcfg["num_attention_heads"] * dcfg["attention_head_dim"]
    if dcfg["caption_projection_dim"] != hidden:
        raise ValueError(
            f"diffusers SD3Transformer2DModel.caption_projection_dim={dcfg['caption_projection_dim']} "
            f"is not supported: the text tokens must have the blocks' width "
            f"num_attention_heads x attention_head_dim = {hidden}"
        )
    joint, pooled = dcfg["joint_attention_dim"], dcfg["pooled_projection_dim"]
    return MMDiTConfig(
        in_channels=dcfg["in_channels"],
        out_channels=dcfg["out_channels"] if dcfg.get("out_channels") is not None else dcfg["in_channels"],
        patch_size=dcfg["patch_size"],
        hidden_size=hidden,
        depth=dcfg["num_layers"],
        num_heads=dcfg["num_attention_heads"],
        context_dim=joint,
        pooled_projection_dim=None if pooled == joint else pooled,
        sample_size=dcfg["sample_size"],
        pos_embed_max_size=dcfg["pos_embed_max_size"],
        qk_norm=dcfg.get("qk_norm"),
    )


def diffusers_kwargs(config: MMDiTConfig) -> dict[str, Any]:
    """MMDiTConfig -> keyword arguments of diffusers' SD3Transformer2DModel that build the same network."""
    return {
        "sample_size": config.sample_size,
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "num_layers": config.depth,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_dim,
        "caption_projection_dim": config.hidden_size,
        "pooled_projection_dim": config.pooled_dim,
        "out_channels": config.out_channels,
        "pos_embed_max_size": config.pos_embed_max_size,
        "dual_attention_layers": (),
        "qk_norm": config.qk_norm,
    }


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def mmdit_from_diffusers(d: Any) -> MMDiT:
    """diffusers SD3Transformer2DModel -> our MMDiT with the same weights (hence the same outputs)."""
    ours = MMDiT(config_from_diffusers(d.config))
    by_diffusers_key = {diffusers_key(k): k for k in unfuse(ours.state_dict())}
    theirs = d.state_dict()
    check_same_keys(set(by_diffusers_key), set(theirs), "diffusers -> ours")
    ours.load_state_dict({by_diffusers_key[k]: v for k, v in theirs.items()})
    return like(ours, d)


def mmdit_to_diffusers(m: MMDiT) -> Any:
    """Our MMDiT -> diffusers SD3Transformer2DModel with the same weights (hence the same outputs)."""
    from diffusers import SD3Transformer2DModel

    d = SD3Transformer2DModel(**diffusers_kwargs(m.config))
    state = {diffusers_key(k): v for k, v in unfuse(m.state_dict()).items()}
    check_same_keys(set(state), set(d.state_dict()), "ours -> diffusers")
    d.load_state_dict(state)
    return like(d, m)


__all__ = ["config_from_diffusers", "diffusers_key", "diffusers_kwargs", "mmdit_from_diffusers", "mmdit_to_diffusers"]
