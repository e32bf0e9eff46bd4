"""APDM (arXiv 2511.01307): the Direct Protective Optimization loss at the attacked weights.

``loss='dpo'`` (the paper): prefer the positive x+ (a generic class image) over the subject x-
under the instance prompt, relative to the frozen model (Eq. 8); ``'naive'``: -L_per + lambda
L_ppl (the paper's ablation); ``'target'``: pull the instance-prompt prediction on subject
images toward the frozen model's class-prompt prediction (the attacker learns a generic member
of the class; the demo world's preset). All three add lambda times the prior-preservation term.
"""

from __future__ import annotations

import torch

from ...losses import dpo_loss, naive_adversarial_loss, noise_prediction_loss, target_loss
from ...training import NoisyBatch
from ..base import ProtectionMethod, add_prior, prior_batch


class APDM(ProtectionMethod):
    name = "apdm"
    description = (
        "APDM (arXiv 2511.01307): Direct Protective Optimization loss trained with Learning to Protect"
    )

    def protection_loss(self, trainer, unet) -> tuple[torch.Tensor, dict[str, float]]:
        """DPO (or naive, or target) loss plus lambda * prior preservation, at the weights of ``unet``.

        The whole batch is drawn (same random stream on every process); with several processes
        each keeps its slice of the samples.
        """
        d, g, cfg = trainer.data, trainer.generator, trainer.cfg
        b = cfg.batch_size
        s = trainer.parallel.shard(b)
        prior = prior_batch(trainer, b)
        use_prior = prior is not None
        if cfg.loss == "dpo":
            k = torch.randint(0, len(d.subject), (b,), generator=g)
            z_pos, z_neg = d.positive.sample(k, g), d.subject.sample(k, g)
            noise, t = d.diffusion.noise_and_timesteps(z_pos, g)  # the pair shares t and the noise
            pos = d.diffusion.noisy(z_pos, trainer.instance_embeds, g, noise, t).select(s)
            neg = d.diffusion.noisy(z_neg, trainer.instance_embeds, g, noise, t).select(s)
            n = pos.latents.shape[0]  # samples on this process
            pair = NoisyBatch.cat(pos, neg)
            pred = trainer.forward(unet, NoisyBatch.cat(pair, prior) if use_prior else pair)
            with torch.no_grad():
                ref = trainer.forward_ref(trainer.run_ref, pair)
            err = (pred[: 2 * n].float() - pair.target.float()).pow(2)
            ref_err = (ref.float() - pair.target.float()).pow(2)
            loss, st = dpo_loss(err[:n], err[n:], ref_err[:n], ref_err[n:], cfg.beta, cfg.dpo_reduction)
            stats = {"dpo": float(loss.detach()), **{k2: float(v) for k2, v in st.items()}}
            if use_prior:
                loss = add_prior(loss, stats, pred[2 * n :], prior, cfg.prior_weight)
            return loss, stats
        if cfg.loss == "target":  # the attacked model should predict what the original predicts for the class
            inst = d.diffusion.noisy(d.subject.draw(b, g), trainer.instance_embeds, g).select(s)
            n = inst.latents.shape[0]
            pred = trainer.forward(unet, NoisyBatch.cat(inst, prior) if use_prior else inst)
            as_class = NoisyBatch(inst.latents, inst.timesteps, inst.target, d.class_embeds.expand(n, -1, -1))
            with torch.no_grad():
                generic = trainer.forward_ref(trainer.run_ref, as_class)
            loss = target_loss(pred[:n], generic)
            stats = {
                "target": float(loss.detach()),
                "subject_err": float(noise_prediction_loss(pred[:n].detach(), inst.target)),
            }
            if use_prior:
                loss = add_prior(loss, stats, pred[n:], prior, cfg.prior_weight)
            return loss, stats
        # naive: -L_per + lambda * L_ppl
        inst = d.diffusion.noisy(d.subject.draw(b, g), trainer.instance_embeds, g).select(s)
        n = inst.latents.shape[0]
        pred = trainer.forward(unet, NoisyBatch.cat(inst, prior) if use_prior else inst)
        per = noise_prediction_loss(pred[:n], inst.target)
        prior_loss = (
            noise_prediction_loss(pred[n:], prior.target) if use_prior else torch.zeros((), device=per.device)
        )
        loss = naive_adversarial_loss(per, prior_loss, cfg.naive_lambda)
        return loss, {"neg_per": float(-per.detach()), "prior": float(prior_loss.detach())}
