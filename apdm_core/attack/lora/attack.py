"""LoRA DreamBooth via peft: low-rank adapters on the UNet's attention projections.

The attack most users run (diffusers' train_dreambooth_lora.py): ``LoraConfig(r, lora_alpha,
init_lora_weights='gaussian', target_modules=to_k/to_q/to_v/to_out.0)`` added to a copy of the
UNet; only the adapter weights train, the base weights stay exactly as they were.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ...errors import InputError
from ...models import SDModel
from ..base import Attack, AttackResult, frozen_copy_of_unet, register_attack
from ..config import AttackConfig


@register_attack("lora")
class LoRAAttack(Attack):
    defaults = {"steps": 800, "lr": 1e-4, "prior_weight": 1.0}

    def __init__(self, model: SDModel, cfg: AttackConfig, device: torch.device) -> None:
        from peft import LoraConfig

        super().__init__(model, cfg, device)
        unet = frozen_copy_of_unet(model, cfg.gradient_checkpointing)
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=list(cfg.lora_targets),
        )
        # the gaussian init draws from torch's global RNG: seed it locally, leave the caller's RNG alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            try:
                unet.add_adapter(lora)
            except ValueError as exc:
                raise InputError(
                    f"LoRA could not be added to the UNet ({exc}); check --lora-targets "
                    "(module names such as to_k to_q to_v to_out.0)."
                ) from exc
        self.unet = unet.to(device).train()

    @property
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.unet.named_parameters() if p.requires_grad}

    def save(self, result: AttackResult, folder: Path) -> None:
        """pytorch_lora_weights.safetensors, loadable with ``pipeline.load_lora_weights(folder)``."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)

    @classmethod
    def load(cls, model: SDModel, folder: Path, cfg: AttackConfig) -> tuple[SDModel, dict[str, str]]:
        """The model with the LoRA weights from ``folder`` on a copy of its UNet."""
        unet = frozen_copy_of_unet(model)
        model.pipeline(unet=unet).load_lora_weights(str(folder))
        return dataclasses.replace(model, unet=unet.eval(), _fingerprint=None), {}
