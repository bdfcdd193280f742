"""AutoencoderKL ↔ diffusers' AutoencoderKL: the config mapping and an explicit, invertible key mapping.

The layer structure is the same, so conversion is a renaming of state-dict keys; nothing is reshaped (both sides
use Linear layers for the mid-block attention). Configs diffusers allows but we cannot represent are refused with
the field named, never approximated.
"""

from __future__ import annotations

import re
from typing import Any

from ldm_core.models.autoencoder import AutoencoderConfig, AutoencoderKL

# (our pattern, diffusers pattern), applied to the key suffix after "encoder."/"decoder."; order matters only
# in that the first match wins.
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _ours_to_diffusers_key(key: str) -> str:
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m:
        part, kind, i, j, layer, p = m.groups()
        blocks = "down_blocks" if kind == "down" else "up_blocks"
        return f"{part}.{blocks}.{i}.resnets.{j}.{_RESNET[layer]}.{p}"
    m = re.fullmatch(r"(encoder)\.down\.(\d+)\.downsample\.conv\.(weight|bias)", key)
    if m:
        return f"encoder.down_blocks.{m.group(2)}.downsamplers.0.conv.{m.group(3)}"
    m = re.fullmatch(r"(decoder)\.up\.(\d+)\.upsample\.conv\.(weight|bias)", key)
    if m:
        return f"decoder.up_blocks.{m.group(2)}.upsamplers.0.conv.{m.group(3)}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.block_(\d)\.(\w+)\.(weight|bias)", key)
    if m:
        part, n, layer, p = m.groups()
        return f"{part}.mid_block.resnets.{int(n) - 1}.{_RESNET[layer]}.{p}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", key)
    if m:
        part, layer, p = m.groups()
        return f"{part}.mid_block.attentions.0.{_ATTN[layer]}.{p}"
    m = re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", key)
    if m:
        return f"{m.group(1)}.conv_norm_out.{m.group(2)}"
    top_level = key.split(".")[0] in ("quant_conv", "post_quant_conv")
    if top_level or re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.(weight|bias)", key):
        return key
    raise KeyError(f"no diffusers name for parameter {key!r}")


def config_from_diffusers(dcfg: Any) -> AutoencoderConfig:
    get = (lambda k, d=None: dcfg.get(k, d)) if isinstance(dcfg, dict) else (lambda k, d=None: getattr(dcfg, k, d))
    boc = list(get("block_out_channels"))
    for name, expected in (("act_fn", "silu"),):
        if get(name, expected) != expected:
            raise ValueError(f"diffusers AutoencoderKL.{name}={get(name)!r} is not supported (only {expected!r})")
    for t in get("down_block_types"):
        if t != "DownEncoderBlock2D":
            raise ValueError(
                f"diffusers AutoencoderKL.down_block_types contains {t!r}; only DownEncoderBlock2D is supported"
            )
    for t in get("up_block_types"):
        if t != "UpDecoderBlock2D":
            raise ValueError(
                f"diffusers AutoencoderKL.up_block_types contains {t!r}; only UpDecoderBlock2D is supported"
            )
    ch = boc[0]
    if any(c % ch for c in boc):
        raise ValueError(f"diffusers AutoencoderKL.block_out_channels={boc} is not a multiple of its first entry")
    if get("latents_mean") is not None or get("latents_std") is not None:
        raise ValueError("diffusers AutoencoderKL.latents_mean/latents_std (per-channel statistics) are not supported")
    return AutoencoderConfig(
        kind="kl",
        in_channels=get("in_channels"),
        out_channels=get("out_channels"),
        ch=ch,
        ch_mult=[c // ch for c in boc],
        num_res_blocks=get("layers_per_block"),
        z_channels=get("latent_channels"),
        norm_groups=get("norm_num_groups"),
        mid_attention=bool(get("mid_block_add_attention", True)),
        use_quant_conv=bool(get("use_quant_conv", True)),
        use_post_quant_conv=bool(get("use_post_quant_conv", True)),
        resolution=get("sample_size", 256),
        scaling_factor=float(get("scaling_factor", 1.0)),
        shift_factor=float(get("shift_factor") or 0.0),
    )


def diffusers_kwargs(cfg: AutoencoderConfig) -> dict[str, Any]:
    if cfg.kind != "kl":
        raise ValueError("only the KL autoencoder has a diffusers counterpart (AutoencoderKL)")
    n = len(cfg.ch_mult)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        act_fn="silu",
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups,
        sample_size=cfg.resolution,
        scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor or None,
        use_quant_conv=cfg.use_quant_conv,
        use_post_quant_conv=cfg.use_post_quant_conv,
        mid_block_add_attention=cfg.mid_attention,
    )


def autoencoder_from_diffusers(model: Any) -> AutoencoderKL:
    ours = AutoencoderKL(config_from_diffusers(model.config))
    theirs = model.state_dict()
    sd = {}
    for key in ours.state_dict():
        dkey = _ours_to_diffusers_key(key)
        if dkey not in theirs:
            raise KeyError(f"diffusers model has no parameter {dkey!r} (for our {key!r})")
        sd[key] = theirs[dkey].detach().clone().float()
    ours.load_state_dict(sd, strict=True)
    return ours.to(next(model.parameters()).device)


def autoencoder_to_diffusers(model: AutoencoderKL) -> Any:
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    theirs = DiffusersAutoencoderKL(**diffusers_kwargs(model.config))
    sd = {_ours_to_diffusers_key(k): v.detach().clone() for k, v in model.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch converting to diffusers: missing {missing}, unexpected {unexpected}")
    return theirs.to(next(model.parameters()).device)
