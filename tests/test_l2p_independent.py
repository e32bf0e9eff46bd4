"""One outer L2P step recomputed from first principles, independently of the engine's building blocks.

``test_protect.py`` rebuilds the accumulated gradient with the trainer's own losses, and
``ReferenceL2P`` (benchmarks/perf_tools.py) reuses ``Diffusion``, ``LatentBank``, ``NoisyBatch`` and
``dpo_loss``: a bug in those would pass both. Here the only things taken from the run are the
inputs the UNets actually received (recorded by forward hooks); everything else is written out:
the noise recovered from x_t with alpha_bar computed from the scheduler's betas by hand, the
DreamBooth, DPO (paper Eq. 14, per sample) and prior losses, the attacker's AdamW (torch's own),
the sum of the protection gradients and theta's AdamW update.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from apdm_core.data import load_subject_images
from apdm_core.l2p import L2PTrainer, prepare_data
from apdm_core.loading import load_model
from apdm_core.training import LatentBank


def test_one_outer_step_from_first_principles(fast_config):
    cfg = fast_config(inner_steps=3, prior_weight=0.5, beta=2.0, batch_size=1, lr_protect=1e-3,
                      lr_personalize=1e-3, adam_weight_decay=0.0)  # fmt: skip
    model = load_model(cfg.model)
    subjects = load_subject_images(cfg.images, model.native_resolution)[:1]  # one image per bank:
    data = prepare_data(cfg, model, subjects, model.native_resolution, None, None)
    for name in ("subject", "positive", "prior"):  # ... and no VAE noise: z0 is known exactly
        bank = getattr(data, name)
        setattr(data, name, LatentBank(bank.mean[:1], torch.zeros_like(bank.std[:1])))
    trainer = L2PTrainer(cfg, model, data, torch.device("cpu"))
    z = {n: getattr(data, n).mean for n in ("subject", "positive", "prior")}
    c_inst, c_cls = data.instance_embeds, data.class_embeds
    betas = torch.tensor(model.noise_scheduler().config.get("trained_betas") or [], dtype=torch.float64)
    sched = model.noise_scheduler().config
    if not len(betas):  # scaled_linear, as SD
        betas = torch.linspace(sched.beta_start**0.5, sched.beta_end**0.5, sched.num_train_timesteps,
                               dtype=torch.float64) ** 2  # fmt: skip
    alpha_bar = torch.cumprod(1 - betas, 0)

    calls = {"theta_prime": [], "ref": []}
    hooks = [
        trainer.unet_p.register_forward_pre_hook(
            lambda m, a, kw: calls["theta_prime"].append((a[0].detach().clone(), a[1].clone(),
                                                          kw["encoder_hidden_states"].detach().clone())),
            with_kwargs=True),
        trainer.ref_unet.register_forward_pre_hook(
            lambda m, a, kw: calls["ref"].append(a[0].detach().clone()), with_kwargs=True),
    ]  # fmt: skip
    theta0 = copy.deepcopy(trainer.unet)
    trainer.outer_step()
    for h in hooks:
        h.remove()
    assert len(calls["theta_prime"]) == 2 * cfg.inner_steps and len(calls["ref"]) == cfg.inner_steps

    def noise_of(x_t, t, z0):  # epsilon model: the target is the noise, recovered from x_t
        ab = alpha_bar[t].float().view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * z0) / (1 - ab).sqrt()

    def predict(unet, x_t, t, c):
        return unet(x_t, t, encoder_hidden_states=c, return_dict=False)[0]

    # replay: theta' from theta0, the attacker's AdamW, the protection gradient summed after each step
    prime = copy.deepcopy(theta0).requires_grad_(True)
    ref = copy.deepcopy(theta0).requires_grad_(False)
    params = list(prime.parameters())
    attacker = torch.optim.AdamW(
        params, lr=cfg.lr_personalize, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    total = [torch.zeros_like(p) for p in params]
    for j in range(cfg.inner_steps):
        x_t, t, c = calls["theta_prime"][2 * j]  # DreamBooth batch: [subject (instance), class image (class)]
        assert torch.equal(c[0], c_inst[0]) and torch.equal(c[1], c_cls[0])
        eps = noise_of(x_t, t, torch.cat([z["subject"], z["prior"]]))
        pred = predict(prime, x_t, t, c)
        per = F.mse_loss(pred[:1], eps[:1]) + cfg.prior_weight * F.mse_loss(pred[1:], eps[1:])
        attacker.zero_grad(set_to_none=True)
        per.backward()
        attacker.step()
        # protection batch: [x+ (instance prompt), x- (instance prompt), class image (class prompt)]
        x_t, t, c = calls["theta_prime"][2 * j + 1]
        assert t[0] == t[1] and torch.equal(c[0], c_inst[0]) and torch.equal(c[2], c_cls[0])
        eps = noise_of(x_t, t, torch.cat([z["positive"], z["subject"], z["prior"]]))
        assert torch.allclose(eps[0], eps[1], atol=1e-4)  # the pair shares its noise
        pred = predict(prime, x_t, t, c)
        with torch.no_grad():
            pred_ref = predict(ref, x_t[:2], t[:2], c[:2])
        err = ((pred[:2] - eps[:2]) ** 2).flatten(1).mean(1)
        err_ref = ((pred_ref - eps[:2]) ** 2).flatten(1).mean(1)
        d_pos, d_neg = err[0] - err_ref[0], err[1] - err_ref[1]
        dpo = -F.logsigmoid(-cfg.beta * (d_pos - d_neg))
        prior = F.mse_loss(pred[2:], eps[2:])
        grads = torch.autograd.grad(dpo + cfg.prior_weight * prior, params)
        for acc, g in zip(total, grads):
            acc.add_(g)
        assert math.isfinite(float(dpo))
    for acc, mine in zip(total, trainer.accum):  # float32 rounding (it differs with the thread count) on
        # the scale of each gradient: a wrong sign, term or step is off by the order of the gradient itself
        torch.testing.assert_close(mine, acc, rtol=1e-3, atol=1e-4 * float(acc.abs().max()) + 1e-9)
    # theta moved by one AdamW step on that sum
    outer = copy.deepcopy(theta0)
    opt = torch.optim.AdamW(outer.parameters(), lr=cfg.lr_protect, eps=1e-8, weight_decay=0.0)
    for p, acc in zip(outer.parameters(), total):
        p.grad = acc.clone()
    opt.step()
    moved = sum(float((a - b).abs().sum()) for a, b in zip(trainer.unet.parameters(), theta0.parameters()))
    assert moved > 0
    # AdamW's first step is lr * g / (|g| + eps), a sign step where |g| >> eps: it is compared where the
    # summed gradient is clear of float32 rounding on its tensor's scale (the same scale as above, with a
    # 10x margin: sums of many terms can cancel down to the rounding); no weight moves more than lr.
    # Rounding depends on the thread count (a reduction's order): the bounds hold for 1 and 2 threads.
    for a, b, acc, t0 in zip(outer.parameters(), trainer.unet.parameters(), total, theta0.parameters()):
        clear = acc.abs() > 1e-3 * float(acc.abs().max())
        torch.testing.assert_close(a[clear], b[clear], rtol=0, atol=0.01 * cfg.lr_protect)
        assert float((b - t0).abs().max()) <= 1.01 * cfg.lr_protect
