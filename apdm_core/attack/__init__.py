"""Personalization attacks that test a protection: DreamBooth, LoRA DreamBooth, Textual Inversion.

``run_attack(model, images, AttackConfig(kind=...))`` returns an ``AttackResult`` with the
attacked model (the input model object is never modified), the loss history and a cancelled
flag. Attacks are registered by name (``register_attack``), one module each.
"""

from __future__ import annotations

from . import dreambooth  # noqa: F401  (register the built-in attacks)
from .base import (
    Attack,
    AttackResult,
    AugmentedBank,
    get_attack,
    load_attack_output,
    register_attack,
    registered_attacks,
    run_attack,
)
from .config import AttackConfig
from .lora import attack as _lora  # noqa: F401
from .textual_inversion import attack as _ti  # noqa: F401

__all__ = [
    "Attack",
    "AttackConfig",
    "AttackResult",
    "AugmentedBank",
    "get_attack",
    "load_attack_output",
    "register_attack",
    "registered_attacks",
    "run_attack",
]
