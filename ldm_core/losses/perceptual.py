"""LPIPS, the learned perceptual distance (Zhang et al. 2018), built from explicitly resolved weights.

``lpips.LPIPS(net="vgg")`` would normally fetch the ImageNet VGG16 through torchvision at construction time and load its
linear layers from a path of its own. Here it is constructed empty (nothing downloaded, nothing loaded implicitly) and
both weight sets are loaded from files that :mod:`ldm_core.pretrained` resolves, so a missing file is reported by name
and location instead of failing deep inside torchvision.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lpips
import torch

from ldm_core import pretrained

# torchvision VGG16 `features` indices held by each of lpips' five slices (ends exclusive): the ReLU outputs
# relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 are the slices' outputs.
VGG16_SLICES: tuple[tuple[int, int], ...] = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
N_LINEAR_LAYERS = 5


def build_lpips(download: bool = True) -> lpips.LPIPS:
    """A frozen LPIPS-VGG (v0.1) with the torchvision VGG16 backbone and the package's learned linear layers.

    Inputs are images in [-1, 1], (B, 3, H, W); the output is one distance per image, (B, 1, 1, 1).
    Its parameters do not require grad, but gradient flows to its inputs (it is a training loss for the decoder).
    Raises :class:`ldm_core.pretrained.MissingPretrainedWeights` when the VGG16 checkpoint is absent and cannot be
    downloaded.
    """
    # Resolve files before building anything, so a missing file fails in milliseconds.
    vgg_path = pretrained.resolve("vgg16", download=download)
    linear_path = pretrained.resolve("lpips_vgg_linear", download=False)

    with warnings.catch_warnings():
        # lpips passes torchvision's deprecated `pretrained=` flag; with pnet_rand=True it only means "random init".
        warnings.simplefilter("ignore", UserWarning)
        # use_dropout=False: the linear layers are frozen, and without Dropout modules the distance is the same in
        # train and eval mode, whatever a parent module's .train() does to it.
        model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, use_dropout=False, verbose=False)

    load_vgg16_features(model, torch.load(vgg_path, map_location="cpu", weights_only=True), source=vgg_path)
    load_linear_layers(model, torch.load(linear_path, map_location="cpu", weights_only=True), source=linear_path)

    model.eval()
    model.requires_grad_(False)
    return model


def load_vgg16_features(model: lpips.LPIPS, state_dict: dict[str, torch.Tensor], source: str | Path = "<dict>") -> None:
    """Copy torchvision ``features.{i}.weight/bias`` into lpips' ``slice{k}.{i}.*``; other keys are ignored."""
    wanted = model.net.state_dict().keys()  # e.g. "slice2.5.weight"
    mapped: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for key in wanted:
        _slice, index, kind = key.split(".")
        tv_key = f"features.{index}.{kind}"
        if tv_key in state_dict:
            mapped[key] = state_dict[tv_key]
        else:
            missing.append(tv_key)
    if missing:
        raise ValueError(
            f"VGG16 checkpoint {source} lacks {len(missing)} feature tensors, e.g. {missing[:3]}: "
            "expected torchvision's vgg16 state dict (keys 'features.<i>.weight/bias')"
        )
    model.net.load_state_dict(mapped, strict=True)


def load_linear_layers(model: lpips.LPIPS, state_dict: dict[str, torch.Tensor], source: str | Path = "<dict>") -> None:
    """Load lpips' learned 1×1 convs (stored as ``lin{k}.model.1.weight``, index 1 because Dropout precedes them)."""
    for k in range(N_LINEAR_LAYERS):
        key = f"lin{k}.model.1.weight"
        if key not in state_dict:
            raise ValueError(f"LPIPS linear-layer file {source} lacks {key!r}")
        weight = getattr(model, f"lin{k}").model[-1].weight  # (1, C_k, 1, 1)
        if state_dict[key].shape != weight.shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(state_dict[key].shape)}, expected {tuple(weight.shape)}"
            )
        with torch.no_grad():
            weight.copy_(state_dict[key])
