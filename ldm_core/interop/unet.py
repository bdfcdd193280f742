"""Our UNet <-> diffusers' UNet2DConditionModel: a config mapping and an explicit, invertible key mapping.

The two networks have the same layers in the same order (diffusers' SD-1/2 layout), so converting is renaming
state-dict keys, after splitting our fused attention projections (``qkv``, ``to_kv``) into diffusers' separate
ones (stacked back on the way in, exactly); no tensor is reshaped because ``use_linear_projection`` maps
one-to-one (Linear vs 1x1-conv proj_in/proj_out on both sides). Settings diffusers allows but our UNet cannot
represent are refused with the field named, never approximated. Our ``context_mask`` is diffusers'
``encoder_attention_mask``.
"""

from __future__ import annotations

import re
from typing import Any

from ldm_core.interop.weights import check_same_keys, like
from ldm_core.models.fused_projections import unfuse
from ldm_core.models.unet import RES_NORM_EPS, TIME_EMBED_MULT, UNet, UNetConfig

_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
_MID = "UNetMidBlock2DCrossAttn"


# ---------------------------------------------------------------------------------------------------------------
# State-dict keys
# ---------------------------------------------------------------------------------------------------------------

# Renames inside a residual block / a spatial transformer, applied to the key suffix below the block.
_RESNET = [(r"^time_proj\.", "time_emb_proj."), (r"^shortcut\.", "conv_shortcut.")]
_TRANSFORMER = [
    (r"^blocks\.(\d+)\.self_attn\.to_out\.", r"transformer_blocks.\1.attn1.to_out.0."),
    (r"^blocks\.(\d+)\.cross_attn\.to_out\.", r"transformer_blocks.\1.attn2.to_out.0."),
    (r"^blocks\.(\d+)\.self_attn\.", r"transformer_blocks.\1.attn1."),
    (r"^blocks\.(\d+)\.cross_attn\.", r"transformer_blocks.\1.attn2."),
    (r"^blocks\.(\d+)\.ff\.proj_in\.", r"transformer_blocks.\1.ff.net.0.proj."),  # GEGLU's projection
    (r"^blocks\.(\d+)\.ff\.proj_out\.", r"transformer_blocks.\1.ff.net.2."),
    (r"^blocks\.", "transformer_blocks."),  # norm1/2/3
]


def _rename(suffix: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, suffix)
        if n:
            return new
    return suffix


def diffusers_key(key: str, num_levels: int) -> str:
    """Our state-dict key -> diffusers' key. Our up levels are indexed by resolution (up.0 = full resolution),
    diffusers' up_blocks in execution order (up_blocks.0 = deepest), hence the index flip."""
    if m := re.fullmatch(r"time_embedder\.fc([12])\.(weight|bias)", key):
        return f"time_embedding.linear_{m[1]}.{m[2]}"
    if key.startswith("norm_out."):
        return "conv_norm_out." + key.removeprefix("norm_out.")
    if re.fullmatch(r"conv_(in|out)\.(weight|bias)", key):
        return key
    if m := re.fullmatch(r"(down|up)\.(\d+)\.(res_blocks|transformers)\.(\d+)\.(.+)", key):
        side, level, part, i, rest = m.groups()
        block = f"down_blocks.{level}" if side == "down" else f"up_blocks.{num_levels - 1 - int(level)}"
        if part == "res_blocks":
            return f"{block}.resnets.{i}.{_rename(rest, _RESNET)}"
        return f"{block}.attentions.{i}.{_rename(rest, _TRANSFORMER)}"
    if m := re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(weight|bias)", key):
        return f"down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(weight|bias)", key):
        return f"up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"mid\.res([12])\.(.+)", key):
        return f"mid_block.resnets.{int(m[1]) - 1}.{_rename(m[2], _RESNET)}"
    if m := re.fullmatch(r"mid\.transformer\.(.+)", key):
        return f"mid_block.attentions.0.{_rename(m[1], _TRANSFORMER)}"
    raise KeyError(f"no diffusers name for UNet parameter {key!r}")


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------

# diffusers settings our UNet has no counterpart for, with the values that mean "not used" (the SD-1/2 values).
_UNSUPPORTED_UNLESS = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu", "swish"),
    "norm_eps": (RES_NORM_EPS,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "mid_block_type": (_MID,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}


def _per_level(cfg: Any, name: str, n: int) -> list[Any]:
    value = cfg[name]
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"diffusers UNet2DConditionModel.{name}={value!r}: expected one entry per level ({n})")
    return values


def _uniform(cfg: Any, name: str, values: list[Any]) -> Any:
    if len(set(map(repr, values))) != 1 or not isinstance(values[0], int):
        raise ValueError(
            f"diffusers UNet2DConditionModel.{name}={cfg[name]!r} is not supported: our UNet uses "
            f"one value for all levels"
        )
    return values[0]


def config_from_diffusers(dcfg: Any) -> UNetConfig:
    """A diffusers UNet2DConditionModel config (its `.config`) -> UNetConfig; ValueError names what we cannot
    represent. `upcast_attention` and `sample_size` are dropped: diffusers' SDPA attention ignores the former and
    the latter is a pipeline default, not part of the network."""
    for name, allowed in _UNSUPPORTED_UNLESS.items():
        if name in dcfg and dcfg[name] not in allowed:
            raise ValueError(
                f"diffusers UNet2DConditionModel.{name}={dcfg[name]!r} is not supported "
                f"(our UNet implies {allowed[0]!r})"
            )
    if dcfg.get("time_embedding_dim") not in (None, TIME_EMBED_MULT * dcfg["block_out_channels"][0]):
        raise ValueError(
            f"diffusers UNet2DConditionModel.time_embedding_dim={dcfg['time_embedding_dim']!r} is not "
            f"supported (ours is {TIME_EMBED_MULT} x block_out_channels[0])"
        )
    if dcfg["norm_num_groups"] is None:
        raise ValueError("diffusers UNet2DConditionModel.norm_num_groups=None is not supported (GroupNorm required)")

    widths = list(dcfg["block_out_channels"])
    n = len(widths)
    if any(w % widths[0] for w in widths):
        raise ValueError(
            f"diffusers UNet2DConditionModel.block_out_channels={widths} are not multiples of the "
            f"first entry (ours are model_channels x channel_mult)"
        )
    if any(_per_level(dcfg, "only_cross_attention", n)):
        raise ValueError(
            f"diffusers UNet2DConditionModel.only_cross_attention={dcfg['only_cross_attention']!r} is not supported"
        )

    down = list(dcfg["down_block_types"])
    if any(t not in (_CROSS_DOWN, _PLAIN_DOWN) for t in down):
        raise ValueError(
            f"diffusers UNet2DConditionModel.down_block_types={down} is not supported "
            f"(only {_CROSS_DOWN} and {_PLAIN_DOWN})"
        )
    attention_levels = [lv for lv, t in enumerate(down) if t == _CROSS_DOWN]
    expected_up = [_CROSS_UP if t == _CROSS_DOWN else _PLAIN_UP for t in reversed(down)]
    if list(dcfg["up_block_types"]) != expected_up:
        raise ValueError(
            f"diffusers UNet2DConditionModel.up_block_types={list(dcfg['up_block_types'])} is not "
            f"supported: ours mirror down_block_types, i.e. {expected_up}"
        )

    # the levels whose transformers exist: the attention levels and the mid block (which reads the last entry)
    used = sorted(set(attention_levels) | {n - 1})
    depth = _uniform(
        dcfg, "transformer_layers_per_block", [_per_level(dcfg, "transformer_layers_per_block", n)[lv] for lv in used]
    )
    context_dim = _uniform(dcfg, "cross_attention_dim", _per_level(dcfg, "cross_attention_dim", n))
    layers = _uniform(dcfg, "layers_per_block", _per_level(dcfg, "layers_per_block", n))

    # diffusers' attention_head_dim is, for this class, the number of heads (a misnomer UNet2DConditionModel keeps)
    heads = [(widths[lv], _per_level(dcfg, "attention_head_dim", n)[lv]) for lv in used]  # (width, heads)
    if len({h for _, h in heads}) == 1:
        num_heads, num_head_channels = heads[0][1], None
    elif len({w // h for w, h in heads}) == 1 and all(w % h == 0 for w, h in heads):
        num_heads, num_head_channels = None, heads[0][0] // heads[0][1]
    else:
        raise ValueError(
            f"diffusers UNet2DConditionModel.attention_head_dim={dcfg['attention_head_dim']!r} is not "
            f"supported: neither a fixed number of heads nor a fixed head width"
        )

    return UNetConfig(
        in_channels=dcfg["in_channels"],
        out_channels=dcfg["out_channels"],
        model_channels=widths[0],
        channel_mult=[w // widths[0] for w in widths],
        num_res_blocks=layers,
        attention_levels=attention_levels,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        transformer_depth=depth,
        context_dim=context_dim,
        norm_groups=dcfg["norm_num_groups"],
        dropout=dcfg["dropout"],
        use_linear_projection=bool(dcfg["use_linear_projection"]),
    )


def diffusers_kwargs(config: UNetConfig) -> dict[str, Any]:
    """UNetConfig -> keyword arguments of diffusers' UNet2DConditionModel that build the same network."""
    widths = config.level_channels()
    n = len(widths)
    heads = [config.heads_at(w) for w in widths]
    attn = set(config.attention_levels)
    return dict(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=tuple(_CROSS_DOWN if lv in attn else _PLAIN_DOWN for lv in range(n)),
        mid_block_type=_MID,
        up_block_types=tuple(_CROSS_UP if lv in attn else _PLAIN_UP for lv in reversed(range(n))),
        block_out_channels=tuple(widths),
        layers_per_block=config.num_res_blocks,
        dropout=config.dropout,
        act_fn="silu",
        norm_num_groups=config.norm_groups,
        norm_eps=RES_NORM_EPS,
        cross_attention_dim=config.context_dim,
        transformer_layers_per_block=config.transformer_depth,
        attention_head_dim=heads[0] if len(set(heads)) == 1 else tuple(heads),  # = number of heads (see above)
        use_linear_projection=config.use_linear_projection,
    )


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def unet_from_diffusers(d: Any) -> UNet:
    """diffusers UNet2DConditionModel -> our UNet with the same weights (hence the same outputs)."""
    ours = UNet(config_from_diffusers(d.config))
    n = len(ours.config.channel_mult)
    by_diffusers_key = {diffusers_key(k, n): k for k in unfuse(ours.state_dict())}
    theirs = d.state_dict()
    check_same_keys(set(by_diffusers_key), set(theirs), "diffusers -> ours")
    ours.load_state_dict({by_diffusers_key[k]: v for k, v in theirs.items()})
    return like(ours, d)


def unet_to_diffusers(m: UNet) -> Any:
    """Our UNet -> diffusers UNet2DConditionModel with the same weights (hence the same outputs)."""
    from diffusers import UNet2DConditionModel

    d = UNet2DConditionModel(**diffusers_kwargs(m.config))
    n = len(m.config.channel_mult)
    state = {diffusers_key(k, n): v for k, v in unfuse(m.state_dict()).items()}
    check_same_keys(set(state), set(d.state_dict()), "ours -> diffusers")
    d.load_state_dict(state)
    return like(d, m)


__all__ = ["config_from_diffusers", "diffusers_key", "diffusers_kwargs", "unet_from_diffusers", "unet_to_diffusers"]
