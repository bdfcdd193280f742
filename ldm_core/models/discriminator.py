"""The PatchGAN discriminator of the autoencoder's adversarial loss.

``NLayerDiscriminator`` is the fully convolutional discriminator of pix2pix (Isola et al. 2017), as used by
taming-transformers and the latent-diffusion autoencoders: instead of one real/fake score per image it outputs a grid of
logits, each judging one overlapping patch (70×70 pixels for ``n_layers=3``), which pushes the decoder towards locally
realistic texture rather than global structure (the L1 and perceptual terms take care of that).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ldm_core.config import StrictModel

KERNEL_SIZE = 4
PADDING = 1
LEAKY_SLOPE = 0.2
INIT_STD = 0.02  # DCGAN's init, kept by pix2pix and taming


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


class DiscriminatorConfig(StrictModel):
    """The PatchGAN's shape and normalization."""

    in_channels: int = Field(3, ge=1)
    """Channels of the images it judges (RGB)."""
    ndf: int = Field(64, ge=1)
    """Channels of the first conv; deeper layers use ndf·min(2^n, 8)."""
    n_layers: int = Field(3, ge=1)
    """Number of stride-2 convs; with 3 each logit sees a 70×70 patch and the input shrinks 8× (then −2)."""
    norm: Literal["batch", "actnorm", "group"] = "batch"
    """Normalization after the inner convs. 'batch' is the original; with a few images per device BatchNorm's batch
    statistics are noisy and a known source of GAN instability, so 'actnorm' (data-initialized affine, as in
    taming's option) and 'group' (GroupNorm) are batch-size-independent alternatives."""
    group_norm_groups: int = Field(32, ge=1)
    """Groups for norm='group'; lowered per layer to the largest count that divides that layer's channels."""


# ---------------------------------------------------------------------------------------------------------------
# Normalization layers
# ---------------------------------------------------------------------------------------------------------------


class ActNorm(nn.Module):
    """Per-channel affine map ``scale · (x + loc)`` initialized from the first training batch (Glow, Kingma 2018).

    On the first forward in training mode ``loc = −mean`` and ``scale = 1/(std + 1e-6)`` per channel, so that batch's
    activations come out with zero mean and unit variance; afterwards both are ordinary parameters. The ``initialized``
    buffer is saved in the state dict, so a resumed run does not re-initialize from its first batch. (Under data
    parallelism each rank initializes from its own batch: a multi-process trainer must broadcast rank 0's values.)
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        # A host-side copy of `initialized`, so the per-step check costs no device sync; kept in step on load.
        self._initialized = False

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        flat = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)  # (C, B·H·W)
        mean, std = flat.mean(dim=1), flat.std(dim=1)
        self.loc.copy_(-mean.view(1, -1, 1, 1))
        self.scale.copy_((1.0 / (std + 1e-6)).view(1, -1, 1, 1))
        self.initialized.fill_(1)
        self._initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self._initialized:
            self.initialize(x)
        return self.scale * (x + self.loc)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized.item())


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return next(g for g in range(min(n, limit), 0, -1) if n % g == 0)


def make_norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "actnorm":
        return ActNorm(channels)
    if kind == "group":
        return nn.GroupNorm(_largest_divisor_at_most(channels, groups), channels)
    raise ValueError(f"unknown norm {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# PatchGAN
# ---------------------------------------------------------------------------------------------------------------


class NLayerDiscriminator(nn.Module):
    """PatchGAN: (B, C, H, W) images -> (B, 1, h, w) real/fake logits, one per overlapping patch.

    Layout (taming-transformers' ``NLayerDiscriminator``), all 4×4 convs with padding 1:
      conv stride 2 → LeakyReLU                                   (no norm on the first layer)
      (n_layers − 1) × [conv stride 2 → norm → LeakyReLU]         channels ndf·min(2^n, 8)
      conv stride 1 → norm → LeakyReLU                            channels ndf·min(2^n_layers, 8)
      conv stride 1 → 1 channel                                   the logits
    For n_layers=3: 256² -> 30², 32² -> 2².
    """

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        c = config
        # A conv followed by BatchNorm gets no bias: BatchNorm subtracts the mean and would cancel it (taming does the
        # same). ActNorm and GroupNorm keep it, as taming does for ActNorm.
        use_bias = c.norm != "batch"

        layers: list[nn.Module] = [
            nn.Conv2d(c.in_channels, c.ndf, KERNEL_SIZE, stride=2, padding=PADDING),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        ]
        nf_mult = 1
        for n in range(1, c.n_layers):
            nf_prev, nf_mult = nf_mult, min(2**n, 8)
            layers += [
                nn.Conv2d(c.ndf * nf_prev, c.ndf * nf_mult, KERNEL_SIZE, stride=2, padding=PADDING, bias=use_bias),
                make_norm(c.norm, c.ndf * nf_mult, c.group_norm_groups),
                nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            ]
        nf_prev, nf_mult = nf_mult, min(2**c.n_layers, 8)
        layers += [
            nn.Conv2d(c.ndf * nf_prev, c.ndf * nf_mult, KERNEL_SIZE, stride=1, padding=PADDING, bias=use_bias),
            make_norm(c.norm, c.ndf * nf_mult, c.group_norm_groups),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(c.ndf * nf_mult, 1, KERNEL_SIZE, stride=1, padding=PADDING),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def output_size(self, size: int) -> int:
        """Side of the logit grid for an input side ``size`` (≤ 0 when the input is too small)."""
        for m in self.main:
            if isinstance(m, nn.Conv2d):
                if size < 1:
                    return 0
                size = (size + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
        return size

    def min_input_size(self) -> int:
        return next(s for s in range(1, 1 << 16) if self.output_size(s) >= 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.output_size(h) < 1 or self.output_size(w) < 1:
            raise ValueError(
                f"images of {h}x{w} are too small for a {self.config.n_layers}-layer PatchGAN: each side must be at "
                f"least {self.min_input_size()} (use fewer n_layers)"
            )
        return self.main(x)  # (B, 1, h', w')


def _init_weights(m: nn.Module) -> None:
    """DCGAN init as in taming's ``weights_init``: conv weights N(0, 0.02), norm gains N(1, 0.02), norm biases 0.

    Conv biases keep PyTorch's default init, as in taming. ActNorm is left alone: it initializes from data.
    """
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, INIT_STD)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, INIT_STD)
        nn.init.zeros_(m.bias)
