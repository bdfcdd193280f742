"""Our AutoencoderKL vs diffusers' AutoencoderKL at an identical config and weights.

    python -m benchmarks.autoencoder [--size 64 --batch 4 --channels-last --json out.json]

`run`: the model row, like for like (forward + backward + the same fused Adam step, same memory format).
`run_full_loss`: the training step with the whole loss (LPIPS + PatchGAN + adaptive weight). The two sides do
different work there: ours back-propagates LPIPS and the discriminator once (vector-Jacobian products at the
decoder's last layer), the CompVis recipe does it twice; it is an algorithmic row, labelled so, each side's FLOPs
counted on its own step.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import lpips
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from benchmarks.common import machine_info, print_table, time_alternating, write_json
from ldm_core.distributed import BatchShard
from ldm_core.flops import count_flops
from ldm_core.interop import to_diffusers
from ldm_core.interop.autoencoder import diffusers_kwargs
from ldm_core.losses.autoencoder import AutoencoderLoss, AutoencoderLossConfig
from ldm_core.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_core.models.discriminator import DiscriminatorConfig
from ldm_core.trainers.autoencoder import DiscriminatorStep, GeneratorStep
from ldm_core.trainers.step import make_adam

# Mid-size config: the kl-f8 layout (4 levels, 2 res blocks, mid attention) at half width, so that one
# forward+backward fits a 2-core CPU in well under a second.
BENCH_CONFIG = AutoencoderConfig(ch=64, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, norm_groups=32)


def make_optimizer(model: torch.nn.Module, dev: torch.device) -> torch.optim.Optimizer:
    """The fused Adam both sides take (the autoencoder trainer's settings)."""
    return make_adam(list(model.parameters()), dev, lr=1e-5, betas=(0.5, 0.9))


def train_step(
    side: str, model: torch.nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer, precision: str, gen: torch.Generator
) -> Callable[[], None]:
    """One like-for-like step of the side's model: encode, sample the posterior, decode, L1 + KL, backward, the
    optimizer step (bf16: under autocast)."""
    dev = x.device

    def amp() -> torch.autocast:
        if precision == "bf16":
            return torch.autocast(dev.type, dtype=torch.bfloat16)
        return torch.autocast(dev.type, enabled=False)

    def step_ours() -> None:
        gen.manual_seed(0)
        with amp():
            out = model(x, sample_posterior=True, generator=gen)
            loss = out.reconstruction.float().abs().mean() + 1e-6 * out.reg_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_theirs() -> None:
        gen.manual_seed(0)
        with amp():
            post = model.encode(x).latent_dist
            rec = model.decode(post.sample(generator=gen)).sample
            loss = rec.float().abs().mean() + 1e-6 * post.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step_ours if side == "ours" else step_theirs


def run(
    size: int = 64,
    batch: int = 4,
    rounds: int = 10,
    iters: int = 1,
    precision: str = "fp32",
    device: str = "cpu",
    channels_last: bool = False,
) -> dict:
    """Like for like: forward + backward + the same fused Adam step on both sides, in the same memory format."""
    dev = torch.device(device)
    torch.manual_seed(0)
    ours = AutoencoderKL(BENCH_CONFIG).to(dev).train()
    theirs = to_diffusers(ours).to(dev).train()  # identical weights
    x = torch.randn(batch, 3, size, size, device=dev)
    if channels_last:  # both sides, or the comparison would be of memory formats
        ours, theirs = (m.to(memory_format=torch.channels_last) for m in (ours, theirs))
        x = x.contiguous(memory_format=torch.channels_last)
    opts = {"ours": make_optimizer(ours, dev), "diffusers": make_optimizer(theirs, dev)}
    gen = torch.Generator(device=dev)
    step_ours = train_step("ours", ours, x, opts["ours"], precision, gen)
    step_theirs = train_step("diffusers", theirs, x, opts["diffusers"], precision, gen)

    t = time_alternating(
        {"ours": step_ours, "diffusers": step_theirs}, rounds=rounds, iters=iters, warmup=1, device=dev
    )
    return {
        "benchmark": "autoencoder_train_step",
        "config": BENCH_CONFIG.to_dict(),
        "image_size": size,
        "batch": batch,
        "precision": precision,
        "channels_last": channels_last,
        "machine": machine_info(),
        "optimizer": "fused Adam on both sides",
        "ours_images_per_s": batch / t["ours"],
        "diffusers_images_per_s": batch / t["diffusers"],
        "ratio": t["ratio"],
        **{f"flops_{k}": v for k, v in fwd_bwd_flops(size).items()},
    }


def fwd_bwd_flops(size: int) -> dict[str, float]:
    """Per-image forward + backward FLOPs of each side's own model, counted on the meta device."""
    with torch.device("meta"):
        ours = AutoencoderKL(BENCH_CONFIG)
        theirs = DiffusersAutoencoderKL(**diffusers_kwargs(BENCH_CONFIG))
        x = torch.empty(2, 3, size, size)

    def ours_pass():
        out = ours(x, sample_posterior=False)
        (out.reconstruction.float().abs().mean() + out.reg_loss).backward()

    def theirs_pass():
        post = theirs.encode(x).latent_dist
        (theirs.decode(post.mode()).sample.float().abs().mean() + post.kl().mean()).backward()

    return {"ours": count_flops(ours_pass) / 2, "diffusers": count_flops(theirs_pass) / 2}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    r = run(a.size, a.batch, a.rounds, a.iters, a.precision, a.device, a.channels_last)
    m = r["machine"]
    print(f"machine: {m['cpu']} | {m['threads']} threads | torch {m['torch']} | device {m['device']}")
    print_table(
        [
            {
                "benchmark": f"AutoencoderKL train step (same fused Adam) {a.size}px b{a.batch} {a.precision}"
                f"{' channels_last' if a.channels_last else ''}",
                "ours img/s": f"{r['ours_images_per_s']:.2f}",
                "diffusers img/s": f"{r['diffusers_images_per_s']:.2f}",
                "ratio": f"{r['ratio']:.2f}x",
            }
        ],
        ["benchmark", "ours img/s", "diffusers img/s", "ratio"],
    )
    write_json(r, a.json)
    return r


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------------------------------------------------------
# Full training step with the loss (LPIPS + discriminator), after disc_start: ours vs the reference recipe
# ---------------------------------------------------------------------------------------------------------------


def reference_generator_step(ae, lpips_net, disc, x, gen, disc_weight=0.5, kl_weight=1e-6):
    """The CompVis LPIPSWithDiscriminator step as published (contperceptual.py), on a diffusers AutoencoderKL: nll and
    g each back-propagated to the decoder's last layer for the adaptive weight, then the total loss backward."""
    post = ae.encode(x).latent_dist
    recon = ae.decode(post.sample(generator=gen)).sample
    rec = (x - recon).abs() + lpips_net(x, recon).reshape(-1, 1, 1, 1)
    nll = rec.sum() / x.shape[0]
    kl = post.kl().sum() / x.shape[0]
    logits_fake = disc(recon)
    g = -logits_fake.mean()
    last = ae.decoder.conv_out.weight
    nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach() * disc_weight
    (nll + kl_weight * kl + d_weight * g).backward()
    return recon.detach()


def reference_discriminator_step(disc, x, recon):
    logits_real, logits_fake = disc(x.detach()), disc(recon.detach())
    d_loss = 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())
    d_loss.backward()


def _full_loss_parts(dev: torch.device, size: int, batch: int, disc_norm: str = "actnorm") -> dict:
    """Both sides' modules with identical weights: ours (autoencoder + loss with LPIPS and discriminator) and the
    reference's (diffusers' AutoencoderKL, the same LPIPS, a copy of the discriminator)."""
    torch.manual_seed(0)
    ours = AutoencoderKL(BENCH_CONFIG).to(dev).train()
    theirs = DiffusersAutoencoderKL(**diffusers_kwargs(BENCH_CONFIG)).to(dev).train()
    if dev.type != "meta":
        theirs.load_state_dict(to_diffusers(ours).state_dict())
    # a random VGG16 costs the FLOPs of ImageNet's; its scaling constants ignore the device context, hence .to()
    lp = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).eval().requires_grad_(False).to(dev)
    disc_cfg = DiscriminatorConfig(ndf=64, n_layers=3, norm=disc_norm)
    loss_fn = AutoencoderLoss(AutoencoderLossConfig(disc_start=0), disc_cfg, lp).to(dev)
    ref_disc = copy.deepcopy(loss_fn.discriminator)
    x = torch.rand(batch, 3, size, size, device=dev) * 2 - 1
    return {"ours": ours, "theirs": theirs, "lpips": lp, "loss": loss_fn, "ref_disc": ref_disc, "x": x}


def full_loss_flops(size: int) -> dict[str, float]:
    """Per-image FLOPs of each side's own generator + discriminator passes, counted on the meta device
    (GroupNorm in the discriminator: same FLOPs as ActNorm, without its data-dependent init)."""
    dev = torch.device("meta")
    with dev:
        p = _full_loss_parts(dev, size, 2, disc_norm="group")
    gen_step = GeneratorStep(p["ours"], p["loss"], None, BatchShard(0, 1), sample_posterior=False)
    disc_step = DiscriminatorStep(p["loss"])

    def ours_pass():
        out, terms = gen_step(p["x"], 1)
        gen_step.backward(out, terms, 1.0)
        disc_step(p["x"], out.reconstruction.detach(), 1)[0].backward()

    def theirs_pass():
        post = p["theirs"].encode(p["x"]).latent_dist
        recon = p["theirs"].decode(post.mode()).sample
        rec = (p["x"] - recon).abs() + p["lpips"](p["x"], recon).reshape(-1, 1, 1, 1)
        nll, g = rec.sum() / 2, -p["ref_disc"](recon).mean()
        last = p["theirs"].decoder.conv_out.weight
        nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g, last, retain_graph=True)[0]
        (nll + post.kl().mean() + (nll_grad.norm() / (g_grad.norm() + 1e-4)).detach() * g).backward()
        reference_discriminator_step(p["ref_disc"], p["x"], recon.detach())

    return {"ours": count_flops(ours_pass) / 2, "diffusers": count_flops(theirs_pass) / 2}


def run_full_loss(
    size: int = 64, batch: int = 4, rounds: int = 8, precision: str = "fp32", device: str = "cpu"
) -> dict:
    """One optimizer step of the autoencoder and one of the discriminator, both active, both sides identical
    in weights and in the LPIPS and discriminator modules, and the same fused Adam; the work differs (see the module
    docstring), so each side's FLOPs are its own."""
    dev = torch.device(device)
    p = _full_loss_parts(dev, size, batch)
    ours, theirs, lp, loss_fn, ref_disc, x = (p[k] for k in ("ours", "theirs", "lpips", "loss", "ref_disc", "x"))
    with torch.no_grad():  # ActNorm's data-dependent init, identical on both sides
        loss_fn.discriminator(x)
        ref_disc(x)
    opts = {
        "ours": (
            make_adam(list(ours.parameters()), dev, lr=1e-5, betas=(0.5, 0.9)),
            make_adam(list(loss_fn.discriminator.parameters()), dev, lr=1e-5, betas=(0.5, 0.9)),
        ),
        "diffusers": (
            make_adam(list(theirs.parameters()), dev, lr=1e-5, betas=(0.5, 0.9)),
            make_adam(list(ref_disc.parameters()), dev, lr=1e-5, betas=(0.5, 0.9)),
        ),
    }
    gen = torch.Generator(device=dev)
    amp = (
        (lambda: torch.autocast(dev.type, dtype=torch.bfloat16))
        if precision == "bf16"
        else (lambda: torch.autocast(dev.type, enabled=False))
    )
    gen_step = GeneratorStep(ours, loss_fn, gen, BatchShard(0, 1), sample_posterior=True)
    disc_step = DiscriminatorStep(loss_fn)

    def step_ours():  # what train_autoencoder does per step (one micro-batch, both optimizers)
        gen.manual_seed(0)
        opt_g, opt_d = opts["ours"]
        opt_g.zero_grad(set_to_none=True)
        with amp():
            out, terms = gen_step(x, 1)
        gen_step.backward(out, terms, 1.0)
        opt_g.step()
        opt_d.zero_grad(set_to_none=True)
        with amp():
            d_loss, _ = disc_step(x, out.reconstruction.detach(), 1)
        d_loss.backward()
        opt_d.step()

    def step_theirs():
        gen.manual_seed(0)
        opt_g, opt_d = opts["diffusers"]
        opt_g.zero_grad(set_to_none=True)
        with amp():
            ref_disc.requires_grad_(False)
            recon = reference_generator_step(theirs, lp, ref_disc, x, gen)
            ref_disc.requires_grad_(True)
        opt_g.step()
        opt_d.zero_grad(set_to_none=True)
        with amp():
            reference_discriminator_step(ref_disc, x, recon)
        opt_d.step()

    t = time_alternating({"ours": step_ours, "diffusers": step_theirs}, rounds=rounds, iters=1, warmup=1, device=dev)
    flops = full_loss_flops(size)
    return {
        "benchmark": "autoencoder_train_step_full_loss",
        "config": BENCH_CONFIG.to_dict(),
        "image_size": size,
        "batch": batch,
        "precision": precision,
        "machine": machine_info(),
        "optimizer": "fused Adam on both sides",
        "ours_images_per_s": batch / t["ours"],
        "diffusers_images_per_s": batch / t["diffusers"],
        "ratio": t["ratio"],
        "flops_ours": flops["ours"],
        "flops_diffusers": flops["diffusers"],
    }
