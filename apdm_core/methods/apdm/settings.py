"""APDM's own settings (the loss at the attacked weights); fields of ProtectConfig, group 'apdm'."""

from __future__ import annotations

from dataclasses import dataclass

from ...configio import _f
from ...errors import InputError

LOSSES = ("dpo", "naive", "target")
DPO_REDUCTIONS = ("sample", "element")


@dataclass
class APDMSettings:
    loss: str = _f(
        "dpo",
        "APDM's protection loss at the attacked weights: 'dpo' (the paper), 'naive' (-L_per + lambda*L_ppl, "
        "ablation) or 'target' (pull the instance-prompt prediction on subject images toward the frozen "
        "model's class-prompt prediction: the attacker learns a generic member of the class).",
        LOSSES,
        group="apdm",
    )
    beta: float = _f(
        1.0,
        "DPO beta (1 = strongest protection; 10 or more preserves quality but protects less).",
        group="apdm",
    )
    naive_lambda: float = _f(
        1.0, "lambda in the naive loss L_adv = -L_per + lambda*L_ppl (loss='naive' only).", group="apdm"
    )
    dpo_reduction: str = _f(
        "sample",
        "Apply log-sigmoid per sample (paper) or per latent element (released code).",
        DPO_REDUCTIONS,
        group="apdm",
    )

    def check(self) -> None:
        """Raise InputError for APDM settings out of range (called by ProtectConfig.validate)."""
        if not self.beta > 0:
            raise InputError(f"ProtectConfig.beta must be a positive number (got {self.beta}).")
        if not self.naive_lambda >= 0:
            raise InputError(f"ProtectConfig.naive_lambda must be >= 0 (got {self.naive_lambda}).")
