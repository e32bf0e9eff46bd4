"""``hypergradient``: an outer step's simulated DreamBooth steps unrolled, so that the protection gradient is
the derivative *through* them (second order) instead of the gradient at the attacked weights (first order).

First-order L2P applies grad L_protect(theta'_j) to theta as if theta'_j moved one for one with theta'. It does
not: measured on the demo world, of the loss change that first order predicts for a step on the protected
weights, 15-20% is left after 20 Adam attack steps and 1-4% after 400 (README, eleventh round); the attacker's
other weights answer the change. Here the attack steps of a DreamBooth episode's outer step are taken on tensors
that stay in the autograd graph (gradient with create_graph, the real attacker's clipping and AdamW written out:
decoupled weight decay, bias correction, the moments carried in from the episode's optimizer), the protection
losses after every protect_every-th step are summed with their weights, and that sum is differentiated once with
respect to theta' at the outer step's start. Its gradient goes into the accumulator where the first-order one
would; theta' and the optimizer's state continue from where the unrolled steps left them, so the episode (and
a resume from its state file) goes on as before.

The graph holds every unrolled step: memory grows with inner_steps times a UNet's activations and gradients,
so it is meant for small models (the demo world) and short outer steps. LoRA episodes keep the first-order
gradient. PyTorch's math attention is used (the one SDPA kernel with a double backward).

Measured (README, eleventh round): over a run it protects far less than the first-order gradient (efficiency 0.10 vs
0.56 on the tuning subjects) at 2.5x the cost; its direction changes from one attacker draw to the next where the
first-order one adds up. An option for research, off in every preset.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


class AtWeights:
    """``unet`` evaluated with other tensors in place of its trained parameters (the unrolled theta')."""

    def __init__(self, unet: torch.nn.Module, names: list[str], tensors: list[torch.Tensor]) -> None:
        self.unet, self.tensors = unet, dict(zip(names, tensors))

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.unet, self.tensors, args, kwargs)

    def __getattr__(self, name: str):  # the UNet's config and dtype, for the forward's conditioning
        return getattr(self.unet, name)


def unrolled_attack_steps(trainer, log, episode, tracker, where: str) -> None:
    """The outer step's inner_steps DreamBooth steps of a full episode, unrolled; the accumulator gains the
    gradient of the weighted protection losses with respect to theta' at the step's start."""
    cfg, w = trainer.cfg, trainer.weights
    params = w.params_p
    names = [n for n, p in w.unet_p.named_parameters() if p.requires_grad]
    group = episode.opt.param_groups[0]
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    state = [episode.opt.state.get(p) or {} for p in params]
    k0 = int(state[0]["step"]) if state[0] else 0
    m = [s["exp_avg"].detach() if s else torch.zeros_like(p) for s, p in zip(state, params)]
    v = [s["exp_avg_sq"].detach() if s else torch.zeros_like(p) for s, p in zip(state, params)]
    start = [p.detach().clone().requires_grad_(True) for p in params]
    theta, total = list(start), None
    with sdpa_kernel(SDPBackend.MATH):
        for j in range(cfg.inner_steps):
            loss = trainer.personalization_loss(AtWeights(w.unet_p, names, theta))
            log.per.append(
                trainer._check(float(loss.detach()), "personalization", f"{where}, inner step {j + 1}")
            )
            grads = torch.autograd.grad(loss, theta, create_graph=True, materialize_grads=True)
            if cfg.inner_max_grad_norm > 0:  # clip_grad_norm_'s rule
                norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
                grads = [g * torch.clamp(cfg.inner_max_grad_norm / (norm + 1e-6), max=1.0) for g in grads]
            k = k0 + j + 1
            m = [b1 * a + (1 - b1) * g for a, g in zip(m, grads)]
            v = [b2 * a + (1 - b2) * g * g for a, g in zip(v, grads)]
            step, root = lr / (1 - b1**k), math.sqrt(1 - b2**k)
            theta = [
                t * (1 - lr * wd) - step * a / (safe_sqrt(s) / root + eps) for t, a, s in zip(theta, m, v)
            ]
            episode.h += 1
            if episode.h % cfg.protect_every == 0:
                term = trainer.protection_term(AtWeights(w.unet_p, names, theta), log, f"{where}, inner step {j + 1}",
                                               trainer.protect_weight(episode.h))  # fmt: skip
                total = term if total is None else total + term
            if tracker is not None:
                tracker.update(losses=log.losses(), outer=trainer.step + 1, inner=j + 1)
        if total is not None:
            grads = torch.autograd.grad(total, start, allow_unused=True)
            with torch.no_grad():
                for a, g in zip(w.accum, grads):
                    if g is not None:
                        a.add_(g.to(a.dtype))
    continue_from(episode, params, theta, m, v, k0 + cfg.inner_steps)


def safe_sqrt(s: torch.Tensor) -> torch.Tensor:
    """sqrt(s) with the derivative 0 where s = 0 (a coordinate whose gradients were all 0 so far): sqrt's own is
    infinite there and would turn the whole hypergradient into NaN, while the step's true derivative is finite
    (m = 0 there too)."""
    positive = s > 0
    return torch.where(positive, torch.where(positive, s, torch.ones_like(s)).sqrt(), torch.zeros_like(s))


def continue_from(episode, params, theta, m, v, steps: int) -> None:
    """theta' and the episode's AdamW state where the unrolled steps left them."""
    with torch.no_grad():
        for p, t, a, s in zip(params, theta, m, v):
            p.copy_(t)
            st = episode.opt.state[p]
            if st:
                st["exp_avg"].copy_(a)
                st["exp_avg_sq"].copy_(s)
                st["step"].fill_(steps)
            else:  # torch's AdamW keeps the step count as a float32 tensor (on the device when fused)
                fused = bool(episode.opt.param_groups[0].get("fused"))
                st.update(step=torch.tensor(float(steps), dtype=torch.float32, device=p.device if fused else None),
                          exp_avg=a.detach().clone(), exp_avg_sq=s.detach().clone())  # fmt: skip
