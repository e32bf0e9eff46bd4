"""Sharpness-aware protection (``sam_radius``): the protection gradient taken where the protection is weakest
near theta', so that what protects at theta' still protects a little further along the attacker's way.

SAM (Foret et al., 2010.03412) applied to the protection loss at the attacked weights, as 2502.05374 applies it to
LLM unlearning against relearning: with g = grad L_protect(theta'), the gradient added to the accumulator is that of
L_protect at theta' + rho ||theta'|| g / ||g|| (the same noise and timesteps, theta' restored afterwards). The
eleventh round of the README measured that the attacker's other weights cancel a protection step within about 20
attack steps; the ascent direction is the one along which they cancel it fastest. ``sam_weights='others'`` moves
only those other weights (the ones outside protect_layers), the radius relative to their norm.
"""

from __future__ import annotations

import torch


def flat_protection_gradient(trainer, log, where: str, weight: float = 1.0) -> None:
    """Add ``weight`` x grad L_protect at theta' moved by the radius toward the loss's ascent (theta' kept)."""
    params = trainer.params_p
    # sam_weights='others': only the weights the protection does not move, the ones that cancel it
    if trainer.cfg.sam_weights == "others":
        protected = {id(p_prime) for _, p_prime in trainer.weights.protected_pairs}
        params = [p for p in params if id(p) not in protected]
    rng = trainer.generator.get_state()  # the second evaluation sees the same batch, noise and timesteps
    loss, _ = trainer.protection_loss(trainer.run_p)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
        g_norm = torch.sqrt(sum(g.float().square().sum() for _, g in pairs))
        p_norm = torch.sqrt(sum(p.float().square().sum() for p, _ in pairs))
        saved = [p.detach().clone() for p, _ in pairs]
        scale = float(trainer.cfg.sam_radius * p_norm / (g_norm + 1e-12)) if float(g_norm) > 0 else 0.0
        for p, g in pairs:
            p.add_(g.to(p.dtype), alpha=scale)
    del grads, loss
    trainer.generator.set_state(rng)
    try:
        trainer.weights.accumulate(trainer.protection_term(trainer.run_p, log, where, weight))
    finally:
        with torch.no_grad():
            for (p, _), s in zip(pairs, saved):
                p.copy_(s)
    log.add({"sam_step": scale * float(g_norm)})
