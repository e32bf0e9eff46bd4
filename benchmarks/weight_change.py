"""How far does a DreamBooth attack move a UNet? Relative weight change ||theta_k - theta_0|| / ||theta_0||.

The demo world's attack (AdamW lr 5e-4, batch 2 + 2 prior) is the yardstick of the efficacy
benchmark; its curves record the change on the world model (``benchmarks/efficacy.py --budgets``).
This script puts it beside the paper's attack on a Stable-Diffusion-1.5-shaped UNet (AdamW lr
5e-6): a few full-UNet steps of the same DreamBooth loss on random latents (the size of the step
does not depend on the data: AdamW moves every weight by about lr per step). The SD-shaped UNets
have diffusers' random initialisation, not SD1.5's trained weights (none can be downloaded here),
so their norm is that of the initialisation.

    OMP_NUM_THREADS=1 python benchmarks/weight_change.py --unet world --lr 5e-4 --steps 10
    OMP_NUM_THREADS=2 python benchmarks/weight_change.py --unet sd15 --lr 5e-6 --steps 3   # ~17 GB of RAM
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", default="world", choices=["world", "tiny", "sd15-small", "sd15"])
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2, help="subject latents per step (as many prior latents)")
    ap.add_argument("--latent", type=int, default=8, help="latent side (8 = the world; 64 = SD1.5 at 512 px)")
    args = ap.parse_args()

    import torch
    from perf_tools import bench_model

    from apdm_core.training import Diffusion, LatentBank, dreambooth_loss, make_forward

    model = bench_model(args.unet)
    unet = model.unet.requires_grad_(True).train()
    theta0 = [p.detach().clone() for p in unet.parameters()]  # no flat copies: SD1.5 needs ~17 GB as it is
    n = sum(t.numel() for t in theta0)
    norm0 = sum(float(t.pow(2).sum()) for t in theta0) ** 0.5
    g = torch.Generator().manual_seed(0)
    c = model.unet.config.in_channels
    shape = (8, c, args.latent, args.latent)
    subject = LatentBank(torch.randn(shape, generator=g), torch.zeros(shape))
    prior = LatentBank(torch.randn(shape, generator=g), torch.zeros(shape))
    dim = model.unet.config.cross_attention_dim
    embeds = torch.randn(2, 77 if args.unet != "world" else 16, dim, generator=g)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    diffusion, forward = Diffusion(model.noise_scheduler()), make_forward(torch.device("cpu"))
    print(f"{args.unet}: {n / 1e6:.1f}M parameters, ||theta|| = {norm0:.1f}, lr {args.lr:g}")
    print("| step | relative change | per step (x lr sqrt(N) / ||theta||) | s |")
    print("| ---: | ---: | ---: | ---: |")
    unit = args.lr * n**0.5 / norm0
    for k in range(1, args.steps + 1):
        t0 = time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = dreambooth_loss(
            unet, forward, diffusion, subject, embeds[:1], g, args.batch, prior, embeds[1:], 1.0
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            change = (
                sum(float((p - t).pow(2).sum()) for p, t in zip(unet.parameters(), theta0)) ** 0.5 / norm0
            )
        print(
            f"| {k} | {change:.5f} | {change / unit / k:.2f} | {time.process_time() - t0:.1f} |", flush=True
        )
    print(
        f"\none AdamW step moves at most lr*sqrt(N)/||theta|| = {unit:.5f} relative; k steps at most k times that"
    )


if __name__ == "__main__":
    main()
