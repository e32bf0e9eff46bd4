"""DreamBooth: fine-tune the whole UNet with prior preservation (the paper's attack).

Paper settings (the defaults): AdamW, lr 5e-6, 800 steps, batch 1 subject + 1 class image,
200 class images, gradient clipping 1.0, random crop. The text encoder and VAE stay frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models import SDModel
from .base import Attack, AttackResult, frozen_copy_of_unet, register_attack
from .config import AttackConfig


@register_attack("dreambooth")
class DreamBoothAttack(Attack):
    defaults = {"steps": 800, "lr": 5e-6, "prior_weight": 1.0}

    def __init__(self, model: SDModel, cfg: AttackConfig, device: torch.device) -> None:
        super().__init__(model, cfg, device)
        self.unet = frozen_copy_of_unet(model, cfg.gradient_checkpointing).requires_grad_(True).train()

    @property
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.unet.named_parameters())

    def save(self, result: AttackResult, folder: Path) -> None:
        """A complete diffusers model folder with the fine-tuned UNet."""
        result.model.pipeline().save_pretrained(folder, safe_serialization=True)

    @classmethod
    def load(cls, model: SDModel, folder: Path, cfg: AttackConfig) -> tuple[SDModel, dict[str, str]]:
        """The fine-tuned model saved in ``folder`` (a complete diffusers folder)."""
        from ..loading import load_model

        return load_model(folder, device=model.device), {}
