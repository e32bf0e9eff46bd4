"""The LoRA attack's own settings; fields of AttackConfig (group 'lora')."""

from __future__ import annotations

from dataclasses import dataclass

from ...configio import _f
from ...errors import InputError


@dataclass
class LoRASettings:
    lora_rank: int = _f(4, "LoRA rank r (lora).", group="lora")
    lora_alpha: float = _f(4.0, "LoRA alpha (lora; the update is scaled by alpha / rank).", group="lora")
    lora_targets: list[str] = _f(
        ["to_k", "to_q", "to_v", "to_out.0"], "UNet modules that get LoRA layers (lora).", group="lora"
    )

    def check(self) -> None:
        if self.lora_rank < 1:
            raise InputError(f"AttackConfig.lora_rank must be >= 1 (got {self.lora_rank}).")
        if not self.lora_alpha > 0:
            raise InputError(f"AttackConfig.lora_alpha must be a positive number (got {self.lora_alpha}).")
        if self.kind == "lora" and not self.lora_targets:
            raise InputError("AttackConfig.lora_targets is empty; e.g. to_k to_q to_v to_out.0.")
