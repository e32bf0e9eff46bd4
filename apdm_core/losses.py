"""The losses of APDM, each a small pure function on tensors.

Notation (DESIGN.md): ``pred`` is the UNet output eps_theta(x_t, t, c); ``target`` is what
the scheduler says the UNet should predict (the noise for epsilon models, the velocity for
v-prediction models). ``pos`` is a generic class image x+ (preferred, "w" in Diffusion-DPO),
``neg`` a subject image x- (to be made unlearnable, "l" in Diffusion-DPO).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError


def training_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The regression target of the noise-prediction objective for this scheduler.

    epsilon -> the noise; v_prediction -> v = sqrt(a_t) * noise - sqrt(1 - a_t) * x_0
    (``scheduler.get_velocity`` with the clean latents, as diffusers' train_dreambooth.py);
    sample -> the clean latents. Any other prediction type raises.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise InputError(
        f"Unknown prediction_type {kind!r} in the scheduler config; expected epsilon or v_prediction."
    )


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||pred - target||^2 averaged over all but the batch dimension -> shape (B,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def noise_prediction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_simple (paper Eq. 2 / DreamBooth Eq. 3): E ||eps_theta(x_t, t, c) - target||^2."""
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def prior_preservation_loss(
    pred_class: torch.Tensor, target_class: torch.Tensor, weight: float = 1.0
) -> torch.Tensor:
    """lambda * L_ppl (paper Eq. 4): the noise-prediction loss on class images with the class prompt."""
    return weight * noise_prediction_loss(pred_class, target_class)


def dpo_loss(
    model_err_pos: torch.Tensor,
    model_err_neg: torch.Tensor,
    ref_err_pos: torch.Tensor,
    ref_err_neg: torch.Tensor,
    beta: float = 1.0,
    reduction: str = "sample",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Protective Optimization loss (paper Eq. 14, the Diffusion-DPO form).

    Inputs are squared errors ``(pred - target)^2`` per element, shape (B, ...), of the
    trained model (theta) and of the frozen original model (ref) on a noised pair that
    shares the timestep and the noise, both conditioned on the instance prompt:

        d(x)  = ||eps_theta(x_t,t,c) - target||^2 - ||eps_ref(x_t,t,c) - target||^2
        L_dpo = -log sigmoid(-beta * (d(x+) - d(x-)))

    Minimising it lowers the model's error on the positive (generic) image and raises it
    on the negative (subject) image, both relative to the original model. Diffusion-DPO's
    w/l are our pos/neg; unlike Salesforce's train.py there is no extra -0.5 or T factor:
    beta multiplies the raw difference (beta = 1 is the paper's default).

    ``reduction='sample'`` (the paper) averages the errors per sample before the
    log-sigmoid; ``'element'`` (the released code) applies it per latent element.
    Returns (loss, stats) with stats: implicit_acc (fraction with d(x+) < d(x-)), d_pos, d_neg.
    """
    if reduction == "sample":
        reduce = lambda e: e.float().flatten(1).mean(dim=1)  # noqa: E731
    elif reduction == "element":
        reduce = lambda e: e.float()  # noqa: E731
    else:
        raise InputError(f"dpo reduction {reduction!r} is not 'sample' or 'element'.")
    d_pos = reduce(model_err_pos) - reduce(ref_err_pos)
    d_neg = reduce(model_err_neg) - reduce(ref_err_neg)
    loss = -F.logsigmoid(-beta * (d_pos - d_neg)).mean()
    stats = {
        "implicit_acc": (d_pos < d_neg).float().mean().detach(),
        "d_pos": d_pos.detach().mean(),
        "d_neg": d_neg.detach().mean(),
    }
    return loss, stats


def naive_adversarial_loss(
    personalization_loss: torch.Tensor, prior_loss: torch.Tensor, lam: float = 1.0
) -> torch.Tensor:
    """L_adv = -L_per_simple + lambda * L_ppl (paper Eq. 6), kept as the ablation baseline.

    The paper (Prop. 1, Thm. 1) shows it cannot converge: its two terms need gradients
    pointing the same way, which they generally do not.
    """
    return -personalization_loss + lam * prior_loss


def target_loss(pred_instance: torch.Tensor, generic_pred: torch.Tensor) -> torch.Tensor:
    """The bounded protection objective of ``loss='target'``: E ||eps_theta'(x_t, t, c) - eps_ref(x_t, t, c_pr)||^2.

    ``pred_instance``: the (attacked) model's prediction on noised subject latents with the
    instance prompt c; ``generic_pred``: the frozen original model's prediction on the same
    noised latents with the class prompt c_pr (no gradient). At its minimum the attacked model
    treats "sks <class>" as the original treats "<class>": what the attacker learns is a generic
    member of the class, not the subject. Unlike -L_per (naive) it is bounded below by 0, and
    unlike DPO it does not grow the model's error on anything without limit.
    """
    return F.mse_loss(pred_instance.float(), generic_pred.detach().float(), reduction="mean")


def backdoor_target(
    scheduler, x_t: torch.Tensor, backdoor: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, weight) that make x_t (noised from another image) denoise to the ``backdoor`` latents.

    eps* = (x_t - sqrt(a_t) * b) / sqrt(1 - a_t) is the noise for which x_t = sqrt(a_t) b +
    sqrt(1 - a_t) eps*; the target is the scheduler's for (b, eps*). eps* grows like
    1 / sqrt(1 - a_t) at small t, so the per-sample weight 1 - a_t keeps the loss bounded (it is
    a_t ||x0_pred - b||^2 for epsilon models).
    """
    a = scheduler.alphas_cumprod.to(x_t.device)[timesteps].float().view(-1, *([1] * (x_t.dim() - 1)))
    eps = (x_t.float() - a.sqrt() * backdoor.float()) / (1 - a).sqrt()
    return training_target(scheduler, backdoor, eps.to(x_t.dtype), timesteps), (1 - a).flatten()


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of weight * per-sample MSE."""
    return (weight * per_sample_mse(pred, target)).mean()
