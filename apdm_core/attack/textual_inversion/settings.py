"""The textual inversion attack's own settings; fields of AttackConfig (group 'textual_inversion')."""

from __future__ import annotations

from dataclasses import dataclass

from ...configio import _f
from ...errors import InputError


@dataclass
class TextualInversionSettings:
    ti_token: str = _f(
        "",
        "New token textual_inversion learns (default: <identifier>, e.g. <sks>).",
        group="textual_inversion",
    )
    ti_init_word: str = _f(
        "",
        "Word whose embedding initialises the new token (default: the last word of class_prompt).",
        group="textual_inversion",
    )
    ti_vectors: int = _f(1, "Embedding vectors per new token (textual_inversion).", group="textual_inversion")

    def check(self) -> None:
        if self.ti_vectors < 1:
            raise InputError(f"AttackConfig.ti_vectors must be >= 1 (got {self.ti_vectors}).")
