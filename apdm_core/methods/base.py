"""What a protection method plugs into the shared simulated-attacker loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..losses import noise_prediction_loss

if TYPE_CHECKING:  # the loop passes itself; no import at run time (no circle)
    from ..config import ProtectConfig
    from ..l2p import L2PTrainer
    from ..models import SDModel
    from ..training import NoisyBatch


class ProtectionMethod:
    """One model-level protection: its settings check, its data and its loss terms.

    The loop (``L2PTrainer``) calls, per outer step:

    - ``protection_loss(trainer, unet)`` at the simulated attacker's weights theta' after each
      (``protect_every``-th) attack step; its gradient is accumulated and applied to theta
      (first order, as Learning to Protect);
    - ``theta_loss(trainer)`` once at theta itself, added to that gradient (None: no such term).

    A method reads the batch stream, prompts and forward passes from the trainer (``trainer.data``,
    ``trainer.generator``, ``trainer.forward``, ``trainer.forward_ref``/``trainer.run_ref``,
    ``trainer.instance_embeds``, ``trainer.parallel``) so its draws are part of the resumable RNG.
    """

    name = ""
    description = ""  # one line, recorded in the exported metadata

    def prepare(
        self,
        config: ProtectConfig,
        model: SDModel,
        subjects,
        positives,
        size: int,
        progress=None,
        should_stop=None,
    ) -> dict:
        """Extra encoded data the losses need (``trainer.data.extra``); generated images are cached."""
        return {}

    def protection_loss(self, trainer: L2PTrainer, unet) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def theta_loss(self, trainer: L2PTrainer) -> tuple[torch.Tensor, dict[str, float]] | None:
        return None

    def success_rate(self, samples, config: ProtectConfig, judge) -> float | None:
        """This method's own success measure on samples of the trigger (the instance prompt) after an
        attack, beside the subject similarity every method is judged by (None: no other measure).
        ``judge`` answers ``class_rate(samples)`` (the subject's class) and ``recognised(samples, prompt)``
        (what a prompt names); the demo world's evaluator is one (``world.efficacy.WorldJudge``)."""
        return None

    def uses_theta_loss(self, config: ProtectConfig) -> bool:
        """Whether ``theta_loss`` contributes (it then needs theta on the compute device)."""
        return False


def prior_batch(trainer: L2PTrainer, count: int) -> NoisyBatch | None:
    """``count`` noised class images under the class prompt (this process's share of them), or None
    without prior preservation (no class images, or ``prior_weight`` 0)."""
    d, g = trainer.data, trainer.generator
    if d.prior is None or trainer.cfg.prior_weight <= 0:
        return None
    return d.diffusion.noisy(d.prior.draw(count, g), d.class_embeds, g).select(trainer.parallel.shard(count))


def add_prior(
    loss: torch.Tensor, stats: dict, pred: torch.Tensor, prior: NoisyBatch, weight: float
) -> torch.Tensor:
    """``loss`` + ``weight`` x the prior-preservation term of the prediction ``pred`` on ``prior``
    (recorded as ``stats['prior']``)."""
    prior_loss = noise_prediction_loss(pred, prior.target)
    stats["prior"] = float(prior_loss.detach())
    return loss + weight * prior_loss
