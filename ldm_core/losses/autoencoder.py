"""The autoencoder's training objective: L1 + LPIPS reconstruction, a KL (or VQ) regularizer, and a PatchGAN.

Semantics of CompVis' ``LPIPSWithDiscriminator`` (latent-diffusion ``contperceptual.py``, itself from
taming-transformers, Esser et al. 2021):

    rec   = |x − x̂| + w_p · LPIPS(x, x̂)                      per element; LPIPS broadcast over each image
                                                               ((x − x̂)² with pixel_loss="l2")
    nll   = Σ (rec / e^logvar + logvar) / B                    a Laplace likelihood with one learnable scale
    reg   = KL summed over latent dims, mean over B            VQ: C·H·W · codebook loss (taming weighs it against
                                                               the mean rec; this nll sums C·H·W elements per image)
    g     = −mean D(x̂)                                         the generator's adversarial term
    λ     = w_d · clamp(‖∇_L nll‖ / (‖∇_L g‖ + 1e−4), 0, 1e4)  adaptive weight at the decoder's last layer L
    loss  = nll + w_reg · reg + λ · disc_factor · g            the GAN part only once step ≥ disc_start

The adaptive weight (Esser et al. 2021, eq. 7) balances the two gradients where they meet the decoder, so the GAN term
neither drowns the reconstruction nor vanishes whatever the loss scales. The discriminator starts late (``disc_start``):
a discriminator facing blurry early reconstructions wins at once and its gradient is noise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ldm_core.config import StrictModel
from ldm_core.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
from ldm_core.pretrained import MissingPretrainedWeights

log = logging.getLogger(__name__)

ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


class AutoencoderLossConfig(StrictModel):
    """Weights and schedule of the autoencoder objective (defaults: the CompVis kl-f8 recipe)."""

    pixel_loss: Literal["l1", "l2"] = "l1"
    """Per-element reconstruction error: |x − x̂| (CompVis, beside LPIPS) or (x − x̂)². L1 pulls every pixel with the
    same force whatever its error (it estimates the median), so on its own it learns a large error on few pixels
    last: without LPIPS, a shape whose colour is wrong costs no more pull per pixel than the background's small
    errors, and colours that differ in one channel (red/yellow) can stay merged. L2 pulls in proportion to the
    error. Use "l2" when the perceptual term is off or unavailable."""
    perceptual_weight: float = Field(1.0, ge=0.0)
    """Weight of LPIPS(x, x̂) added to every pixel's L1 error; 0 disables the perceptual term (and its VGG)."""
    kl_weight: float = Field(1e-6, ge=0.0)
    """Weight of the KL to N(0, I): tiny, it only keeps the latents bounded, it is not a VAE prior (reg_kind='kl')."""
    codebook_weight: float = Field(1.0, ge=0.0)
    """Weight of the codebook + commitment loss of the VQ variant (reg_kind='vq'), relative to the *mean*
    reconstruction loss, as in taming-transformers: 1.0 is taming's recipe. The nll here is summed over each image's
    C·H·W elements, so the codebook loss (a mean over latent elements) is multiplied by C·H·W too; the objective is
    then taming's (at logvar 0) times C·H·W, a factor Adam divides out."""
    disc_weight: float = Field(0.5, ge=0.0)
    """Multiplies the adaptive weight of the generator's adversarial term."""
    disc_factor: float = Field(1.0, ge=0.0)
    """Overall factor on both adversarial losses once active; 0 switches the GAN off entirely."""
    disc_start: int = Field(50001, ge=0)
    """First optimizer step at which the discriminator trains and acts; before it neither is evaluated."""
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    """Discriminator objective: hinge (the kl-f8 recipe) or the non-saturating logistic loss ('vanilla')."""
    logvar_init: float = 0.0
    """Initial log-variance of the Laplace likelihood; nll = rec/e^logvar + logvar."""
    learn_logvar: bool = False
    """Train logvar with the autoencoder. CompVis declares it a parameter but never gives it to an optimizer, so it
    stays at logvar_init; True makes it learnable (the autoencoder's optimizer must then own
    ``generator_parameters()``)."""
    allow_missing_perceptual: bool = False
    """When the VGG16 weights for LPIPS are missing: False fails with the file name and directory; True trains
    without the perceptual term and reports it (build_autoencoder_loss returns perceptual_available=False)."""


# ---------------------------------------------------------------------------------------------------------------
# Discriminator objectives
# ---------------------------------------------------------------------------------------------------------------


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))]) (Lim & Ye 2017), means over every patch logit."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (E[−log σ(D(x))] + E[−log(1 − σ(D(x̂)))]), written with softplus for stability."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}


# ---------------------------------------------------------------------------------------------------------------
# The loss module
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GeneratorTerms:
    """The generator objective of one batch before the adaptive weight combines it: nll + reg + λ·g."""

    nll: torch.Tensor
    """Scalar Laplace NLL of (L1 or L2 + w_p·LPIPS), summed over elements, averaged over images."""
    reg: torch.Tensor
    """Scalar regularizer, already weighted (kl_weight·KL, or codebook_weight·C·H·W·VQ loss)."""
    g: torch.Tensor | None
    """Scalar −mean D(x̂), or None while the discriminator is inactive."""
    logs: dict[str, torch.Tensor]


class AutoencoderLoss(nn.Module):
    """Reconstruction + perceptual + regularizer + adaptive PatchGAN loss; owns the discriminator and ``logvar``.

    Two calls per training step, each followed by its own optimizer step:
      ``generator_loss``      -> backward into the autoencoder (the discriminator gets no gradient from it);
      ``discriminator_loss``  -> backward into the discriminator (only when ``disc_active(step)``).

    The perceptual network is injected (None = no perceptual term). It is a frozen metric rebuilt from its weight
    files, so it is kept out of this module's state dict and parameters (no VGG weights in every checkpoint, and a
    checkpoint loads whether or not LPIPS was available), yet ``.to()`` moves it and it always stays in eval mode.
    """

    def __init__(
        self, config: AutoencoderLossConfig, discriminator_config: DiscriminatorConfig, perceptual: nn.Module | None
    ):
        super().__init__()
        self.config = config
        self.discriminator_config = discriminator_config
        self.discriminator = NLayerDiscriminator(discriminator_config)
        self.logvar = nn.Parameter(torch.full((), float(config.logvar_init)), requires_grad=config.learn_logvar)
        self._d_loss = D_LOSSES[config.disc_loss]
        # A plain list hides the module from nn.Module's registry (state_dict, parameters, named_modules);
        # _apply and train below keep it on the right device/dtype and in eval mode.
        self._perceptual: list[nn.Module] = []
        if perceptual is not None:
            perceptual.eval()
            perceptual.requires_grad_(False)
            self._perceptual.append(perceptual)

    @property
    def perceptual(self) -> nn.Module | None:
        return self._perceptual[0] if self._perceptual else None

    @property
    def has_perceptual(self) -> bool:
        """Whether LPIPS is part of the loss (False when disabled or, with allow_missing_perceptual, unavailable)."""
        return self.perceptual is not None and self.config.perceptual_weight > 0

    def _apply(self, fn: Callable, recurse: bool = True) -> AutoencoderLoss:  # .to(), .cuda(), .float(), …
        super()._apply(fn, recurse)
        if self._perceptual:
            self._perceptual[0]._apply(fn)
        return self

    def train(self, mode: bool = True) -> AutoencoderLoss:
        super().train(mode)
        if self._perceptual:
            self._perceptual[0].eval()
        return self

    # -- parameter groups for the trainer's two optimizers ----------------------------------------------------

    def generator_parameters(self) -> list[nn.Parameter]:
        """Parameters of this module that the autoencoder's optimizer must own: logvar when it is learned."""
        return [self.logvar] if self.config.learn_logvar else []

    # -- schedule ----------------------------------------------------------------------------------------------

    def disc_active(self, step: int) -> bool:
        """Whether the discriminator trains and acts at this optimizer step."""
        return step >= self.config.disc_start and self.config.disc_factor > 0

    # -- the autoencoder's loss ---------------------------------------------------------------------------------

    def generator_terms(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        reg_loss: torch.Tensor,
        step: int,
        reg_kind: Literal["kl", "vq"] = "kl",
    ) -> GeneratorTerms:
        """The generator objective's terms for one batch, before the adaptive weight combines them.

        x, recon: (B, C, H, W) in [-1, 1]. reg_loss: a scalar, already reduced (KL summed over latent dims and
        averaged over the batch; or the VQ codebook + commitment loss). The discriminator is evaluated (frozen) only
        once it is active.
        """
        if reg_kind not in ("kl", "vq"):
            raise ValueError(f"reg_kind must be 'kl' or 'vq', got {reg_kind!r}")
        cfg = self.config
        batch = x.shape[0]
        logs: dict[str, torch.Tensor] = {}

        # 1) reconstruction: L1 (or L2) per element, plus LPIPS per image broadcast over that image's elements
        err = _fp32(x - recon)  # (B, C, H, W)
        rec = err.abs() if cfg.pixel_loss == "l1" else err.square()
        logs["rec"] = rec.detach().mean()
        if self.has_perceptual:
            p = _fp32(self.perceptual(x, recon)).reshape(batch, 1, 1, 1)  # (B, 1, 1, 1)
            rec = rec + cfg.perceptual_weight * p
            logs["lpips"] = p.detach().mean()

        # 2) Laplace negative log-likelihood with a global scale, summed over elements, averaged over images
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / batch

        # 3) regularizer. The KL is summed over latent elements like the nll over pixels (CompVis' kl_weight); the
        # VQ loss is a mean, weighted in taming against the mean reconstruction: scaled to our summed nll here
        if reg_kind == "kl":
            reg = cfg.kl_weight * reg_loss
        else:
            reg = cfg.codebook_weight * x[0].numel() * reg_loss

        # 4) adversarial term, only once the discriminator is active (before that it is not even evaluated)
        g_loss = None
        if self.disc_active(step):
            with _frozen(self.discriminator):
                logits_fake = self.discriminator(recon)  # (B, 1, h, w)
            g_loss = -_fp32(logits_fake).mean()
        logs.update(
            {
                "nll": nll.detach(),
                ("kl" if reg_kind == "kl" else "codebook"): _fp32(reg_loss.detach()),
                "logvar": self.logvar.detach().clone(),  # a copy: the optimizer step updates the parameter in place
            }
        )
        return GeneratorTerms(nll, reg, g_loss, logs)

    def _combine(self, terms: GeneratorTerms, d_weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        zero = torch.zeros((), device=terms.nll.device, dtype=terms.nll.dtype)
        g_loss = terms.g if terms.g is not None else zero
        loss = terms.nll + terms.reg + (d_weight * self.config.disc_factor * g_loss if terms.g is not None else 0.0)
        logs = {**terms.logs, "g": g_loss.detach(), "d_weight": d_weight.detach(), "total": loss.detach()}
        return loss, logs

    def generator_loss(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        reg_loss: torch.Tensor,
        step: int,
        last_layer: torch.Tensor | None,
        reg_kind: Literal["kl", "vq"] = "kl",
        grad_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss for one batch, and its terms as detached scalars (no host sync).

        last_layer: the decoder's final conv weight, where the adaptive weight compares gradients; needed once the
        discriminator is active. Under ``torch.no_grad()`` (validation) the adaptive weight cannot be computed and
        is 0, as in CompVis. grad_mean: under data parallelism, averages a gradient over the processes (see
        `adaptive_weight`). Training uses `generator_backward`, which gives this loss's gradients in fewer passes.
        """
        terms = self.generator_terms(x, recon, reg_loss, step, reg_kind)
        d_weight = torch.zeros((), device=terms.nll.device, dtype=terms.nll.dtype)
        if terms.g is not None and torch.is_grad_enabled():
            d_weight = self.adaptive_weight(terms.nll, terms.g, last_layer, grad_mean)
        return self._combine(terms, d_weight)

    def generator_backward(
        self,
        terms: GeneratorTerms,
        recon: torch.Tensor,
        last_layer: torch.Tensor | None,
        grad_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
        scale: float = 1.0,
        loss_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Back-propagate ``scale`` · (the generator loss of `terms`); returns the loss (detached) and the logs.

        loss_scale: fp16's loss scale (`LossScaler.scale`), a 0-d tensor: the gradients are then those of
        loss_scale · scale · loss, so that small ones survive fp16's backward, while the adaptive weight still
        compares the true gradients.

        The gradients are those of ``generator_loss(...)[0].mul(scale).backward()`` (a test holds them equal), in
        fewer passes. Done literally, the adaptive weight back-propagates nll and g to the decoder's last layer, and
        then the total loss is back-propagated again: LPIPS's VGG and the discriminator each run backward twice. Here
        nll and g go backward once, to the reconstruction x̂; their last-layer gradients follow from ∂nll/∂x̂ and
        ∂g/∂x̂ through the last conv alone (vector-Jacobian products with grad_outputs), and one backward from x̂
        carries ∂nll/∂x̂ + λ·∂g/∂x̂ (+ the regularizer's and logvar's own terms) into the autoencoder.
        """

        def scaled(t: torch.Tensor) -> torch.Tensor:
            return t if loss_scale is None else t * loss_scale

        if terms.g is None:  # no GAN term yet: the plain backward is already a single pass
            loss, logs = self._combine(terms, torch.zeros((), device=terms.nll.device, dtype=terms.nll.dtype))
            scaled(loss * scale).backward()
            return loss.detach(), logs
        if last_layer is None:
            raise ValueError(
                "the adaptive GAN weight needs last_layer (the decoder's final conv weight) once the "
                "discriminator is active"
            )
        learn_logvar = self.logvar.requires_grad
        wrt = [recon, self.logvar] if learn_logvar else [recon]
        nll_grads = torch.autograd.grad(scaled(terms.nll), wrt, retain_graph=True)  # LPIPS backward, once
        g_recon = torch.autograd.grad(scaled(terms.g), recon, retain_graph=True)[0]  # discriminator backward, once
        nll_last = torch.autograd.grad(recon, last_layer, nll_grads[0], retain_graph=True)[0]  # last conv only
        g_last = torch.autograd.grad(recon, last_layer, g_recon, retain_graph=True)[0]
        if loss_scale is not None:  # the weight is a ratio of the true gradients' norms (its eps is absolute)
            nll_last, g_last = nll_last / loss_scale, g_last / loss_scale
        d_weight = self._weight_from_grads(nll_last, g_last, grad_mean)
        coef = d_weight * self.config.disc_factor
        recon_grad = ((nll_grads[0] + coef * g_recon) * scale).detach()  # (B, C, H, W)
        # one backward whose gradient is exactly the loss's: Σ x̂·∂L/∂x̂ + reg (+ logvar·∂nll/∂logvar)
        surrogate = (recon * recon_grad).sum() + scaled(terms.reg) * scale
        if learn_logvar:
            surrogate = surrogate + (self.logvar * (nll_grads[1] * scale).detach()).sum()
        surrogate.backward()
        loss, logs = self._combine(terms, d_weight)
        return loss.detach(), logs

    def adaptive_weight(
        self,
        nll: torch.Tensor,
        g_loss: torch.Tensor,
        last_layer: torch.Tensor | None,
        grad_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """w_d · clamp(‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), 0, 1e4), detached (it is a weight, not a path for gradient).

        grad_mean: when each process holds a slice of the batch, the mean over processes of each gradient. A ratio of
        norms is not linear in the batch, so without it every process would weigh the GAN term by its own slice; with
        it the weight is the global batch's, as one process with the whole batch computes it.
        """
        if last_layer is None:
            raise ValueError(
                "the adaptive GAN weight needs last_layer (the decoder's final conv weight) once the "
                "discriminator is active"
            )
        # retain_graph: the same graph is back-propagated again by the trainer's loss.backward()
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        return self._weight_from_grads(nll_grad, g_grad, grad_mean)

    def _weight_from_grads(
        self, nll_grad: torch.Tensor, g_grad: torch.Tensor, grad_mean: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> torch.Tensor:
        if grad_mean is not None:
            nll_grad, g_grad = grad_mean(nll_grad), grad_mean(g_grad)
        ratio = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + ADAPTIVE_WEIGHT_EPS)
        return torch.clamp(ratio, 0.0, ADAPTIVE_WEIGHT_MAX).detach() * self.config.disc_weight

    # -- the discriminator's loss -------------------------------------------------------------------------------

    def discriminator_loss(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        step: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """disc_factor · (hinge or vanilla) loss on real x and fake x̂ (both detached: only D learns from it)."""
        if not self.disc_active(step):
            raise RuntimeError(
                f"discriminator_loss called at step {step}, but the discriminator is inactive "
                f"(disc_start={self.config.disc_start}, disc_factor={self.config.disc_factor}); "
                "check disc_active(step) first"
            )
        logits_real = _fp32(self.discriminator(x.detach()))  # (B, 1, h, w)
        logits_fake = _fp32(self.discriminator(recon.detach()))  # (B, 1, h, w)
        loss = self.config.disc_factor * self._d_loss(logits_real, logits_fake)
        return loss, {
            "d_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision activations (under autocast) are promoted before the losses sum millions of elements."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Switch off requires_grad on the module's parameters for the forwards inside, then restore each flag.

    The autograd graph records which leaves need gradient at forward time, so a forward done inside keeps the
    parameters out of the graph even after the flags are restored: the generator's backward leaves D.grad untouched,
    and no time is spent computing it.
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------------------------


def build_autoencoder_loss(
    config: AutoencoderLossConfig, discriminator_config: DiscriminatorConfig, download: bool = True
) -> tuple[AutoencoderLoss, bool]:
    """The loss with its LPIPS built from resolved weights; returns (loss, perceptual_available).

    perceptual_available is True iff the loss contains the perceptual term. When the VGG16 weights are missing,
    :class:`MissingPretrainedWeights` (naming the file and directory) propagates unless
    ``config.allow_missing_perceptual``, in which case the loss is built without the term, a warning is logged, and
    False is returned for the trainer to record.
    """
    perceptual: nn.Module | None = None
    if config.perceptual_weight > 0:
        # Imported here: lpips pulls in torchvision, which a loss without the perceptual term does not need.
        from ldm_core.losses.perceptual import build_lpips

        try:
            perceptual = build_lpips(download=download)
        except MissingPretrainedWeights as e:
            if not config.allow_missing_perceptual:
                raise
            log.warning("training WITHOUT the LPIPS perceptual term (allow_missing_perceptual=True): %s", e)
    loss = AutoencoderLoss(config, discriminator_config, perceptual)
    return loss, loss.has_perceptual


__all__ = [
    "AutoencoderLoss",
    "AutoencoderLossConfig",
    "D_LOSSES",
    "build_autoencoder_loss",
    "hinge_d_loss",
    "vanilla_d_loss",
]
