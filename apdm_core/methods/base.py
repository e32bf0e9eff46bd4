"""What a protection method plugs into the shared simulated-attacker loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the loop passes itself; no import at run time (no circle)
    from ..config import ProtectConfig
    from ..models import SDModel
    from ..protect import L2PTrainer


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

    def check(self, config: ProtectConfig) -> None:
        """Raise InputError for settings this method cannot run with."""

    def prepare(self, config: ProtectConfig, model: SDModel, subjects, positives, size: int,
                progress=None, should_stop=None) -> dict:  # fmt: skip
        """Extra encoded data the losses need (``trainer.data.extra``); generated images are cached."""
        return {}

    def protection_loss(self, trainer: L2PTrainer, unet) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def theta_loss(self, trainer: L2PTrainer) -> tuple[torch.Tensor, dict[str, float]] | None:
        return None

    def uses_theta_loss(self, config: ProtectConfig) -> bool:
        """Whether ``theta_loss`` contributes (it then needs theta on the compute device)."""
        return False
