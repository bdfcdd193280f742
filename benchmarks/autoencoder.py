"""Our AutoencoderKL vs diffusers' AutoencoderKL: forward+backward images/s at an identical config and weights.

    python -m benchmarks.autoencoder [--size 64 --batch 4 --json out.json]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import machine_info, print_table, time_alternating, write_json
from ldm_core.interop import to_diffusers
from ldm_core.models.autoencoder import AutoencoderConfig, AutoencoderKL

# Mid-size config: the kl-f8 layout (4 levels, 2 res blocks, mid attention) at half width, so that one
# forward+backward fits a 2-core CPU in well under a second.
BENCH_CONFIG = AutoencoderConfig(ch=64, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, norm_groups=32)


def run(size: int = 64, batch: int = 4, rounds: int = 10, iters: int = 1, precision: str = "fp32",
        device: str = "cpu", channels_last: bool = False) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    ours = AutoencoderKL(BENCH_CONFIG).to(dev).train()
    theirs = to_diffusers(ours).to(dev).train()  # identical weights
    x = torch.randn(batch, 3, size, size, device=dev)
    x_ours = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    gen = torch.Generator(device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else torch.autocast(dev.type, enabled=False)

    def step_ours():
        gen.manual_seed(0)
        with amp:
            out = ours(x_ours, sample_posterior=True, generator=gen)
            loss = out.reconstruction.float().abs().mean() + 1e-6 * out.reg_loss
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def step_theirs():
        gen.manual_seed(0)
        with amp:
            post = theirs.encode(x).latent_dist
            rec = theirs.decode(post.sample(generator=gen)).sample
            loss = rec.float().abs().mean() + 1e-6 * post.kl().mean()
        loss.backward()
        theirs.zero_grad(set_to_none=True)

    t = time_alternating({"ours": step_ours, "diffusers": step_theirs}, rounds=rounds, iters=iters, warmup=1, device=dev)
    result = {
        "benchmark": "autoencoder_fwd_bwd", "config": BENCH_CONFIG.to_dict(), "image_size": size, "batch": batch,
        "precision": precision, "channels_last": channels_last, "machine": machine_info(),
        "ours_images_per_s": batch / t["ours"], "diffusers_images_per_s": batch / t["diffusers"],
        "ratio": t["ratio"],
    }
    return result


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
    print_table([{
        "benchmark": f"AutoencoderKL fwd+bwd {a.size}px b{a.batch} {a.precision}",
        "ours img/s": f"{r['ours_images_per_s']:.2f}", "diffusers img/s": f"{r['diffusers_images_per_s']:.2f}",
        "ratio": f"{r['ratio']:.2f}x",
    }], ["benchmark", "ours img/s", "diffusers img/s", "ratio"])
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


def run_full_loss(size: int = 64, batch: int = 4, rounds: int = 8, precision: str = "fp32", device: str = "cpu") -> dict:
    """One optimizer step of the autoencoder and one of the discriminator, both active, both sides identical
    in weights and in the LPIPS and discriminator modules; LPIPS uses a random VGG16 (same FLOPs as ImageNet's)."""
    import copy

    import lpips

    from ldm_core.losses.autoencoder import AutoencoderLoss, AutoencoderLossConfig
    from ldm_core.models.discriminator import DiscriminatorConfig

    dev = torch.device(device)
    torch.manual_seed(0)
    ours = AutoencoderKL(BENCH_CONFIG).to(dev).train()
    theirs = to_diffusers(ours).to(dev).train()
    lp = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).eval().requires_grad_(False).to(dev)
    loss_cfg = AutoencoderLossConfig(disc_start=0)
    disc_cfg = DiscriminatorConfig(ndf=64, n_layers=3, norm="actnorm")
    loss_fn = AutoencoderLoss(loss_cfg, disc_cfg, lp).to(dev)
    ref_disc = copy.deepcopy(loss_fn.discriminator)
    x = torch.rand(batch, 3, size, size, device=dev) * 2 - 1
    with torch.no_grad():  # ActNorm's data-dependent init, identical on both sides
        loss_fn.discriminator(x)
        ref_disc(x)
    from ldm_core.trainers.common import make_adam

    # each side's optimizers as they ship: ours as train_autoencoder builds them (fused Adam), the reference's as the
    # CompVis/diffusers scripts do (torch.optim.Adam with its defaults)
    opts = {
        "ours": (make_adam(list(ours.parameters()), dev, lr=1e-5, betas=(0.5, 0.9)),
                 make_adam(list(loss_fn.discriminator.parameters()), dev, lr=1e-5, betas=(0.5, 0.9))),
        "diffusers": (torch.optim.Adam(theirs.parameters(), lr=1e-5, betas=(0.5, 0.9)),
                      torch.optim.Adam(ref_disc.parameters(), lr=1e-5, betas=(0.5, 0.9))),
    }
    gen = torch.Generator(device=dev)
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else (lambda: torch.autocast(dev.type, enabled=False))
    from ldm_core.distributed import BatchShard
    from ldm_core.trainers.autoencoder import DiscriminatorStep, GeneratorStep

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
    from ldm_core.flops import count_flops

    flops = count_flops(step_ours)
    return {
        "benchmark": "autoencoder_train_step_full_loss", "config": BENCH_CONFIG.to_dict(), "image_size": size,
        "batch": batch, "precision": precision, "machine": machine_info(),
        "ours_images_per_s": batch / t["ours"], "diffusers_images_per_s": batch / t["diffusers"], "ratio": t["ratio"],
        "flops_per_image": flops / batch,
    }
