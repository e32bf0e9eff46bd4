"""Textual Inversion: learn the embedding of one new token; every network weight stays frozen.

As diffusers' textual_inversion.py: add the token to a copy of the tokenizer, grow a copy of
the text encoder's embedding table, initialise the new row(s) from an existing word, train the
embedding table and put every other row back after each step. Prompts then use the new token
(``sks`` -> ``<sks>``); ``AttackResult.prompt`` rewrites them.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from ...errors import InputError
from ...models import SDModel
from ..base import Attack, AttackResult, register_attack, replace_word
from ..config import AttackConfig


@register_attack("textual_inversion")
class TextualInversionAttack(Attack):
    defaults = {"steps": 2000, "lr": 5e-3, "prior_weight": 0.0}

    def __init__(self, model: SDModel, cfg: AttackConfig, device: torch.device) -> None:
        super().__init__(model, cfg, device)
        self.token = cfg.ti_token or f"<{cfg.identifier}>"
        self.tokens = [self.token] + [f"{self.token}_{i}" for i in range(1, cfg.ti_vectors)]
        self.tokenizer = copy.deepcopy(model.tokenizer)
        if self.tokenizer.add_tokens(self.tokens) != len(self.tokens):
            raise InputError(
                f"The tokenizer already knows {self.token!r}; choose a new token with --ti-token (e.g. '<sks-x>')."
            )
        self.token_ids = self.tokenizer.convert_tokens_to_ids(self.tokens)
        init_word = cfg.ti_init_word or cfg.class_noun
        init_ids = self.tokenizer(init_word, add_special_tokens=False).input_ids
        if not init_ids:
            raise InputError(f"--ti-init-word {init_word!r} has no tokens; use a word such as 'person'.")
        self.text_encoder = copy.deepcopy(model.text_encoder).requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # resizing draws random rows: keep the caller's RNG
            try:  # the new rows are overwritten below: skip transformers' mean/covariance init
                self.text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
            except TypeError:  # transformers < 4.46
                self.text_encoder.resize_token_embeddings(len(self.tokenizer))
        table = self.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[self.token_ids] = table[init_ids].mean(dim=0, keepdim=True).to(table.dtype)
        table.requires_grad_(True)
        self.original = table.detach().clone()
        self.keep = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
        self.keep[self.token_ids] = False
        self.ids = None

    @property
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {"token_embedding": self.text_encoder.get_input_embeddings().weight}

    def prompt_map(self) -> dict[str, str]:
        """sks -> <sks>: the diffusers pipeline expands a multi-vector token to <sks> <sks>_1 ... itself."""
        return {self.cfg.identifier: self.token}

    def training_prompt(self) -> str:
        return replace_word(self.cfg.instance_prompt, self.cfg.identifier, " ".join(self.tokens))

    def prompt_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Recomputed every step through the text encoder: the gradient reaches the new row(s)."""
        if self.ids is None:
            tok = self.tokenizer(
                [self.training_prompt(), self.cfg.class_prompt],
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            self.ids = tok.input_ids.to(self.text_encoder.device)
        embeds = self.text_encoder(self.ids)[0]
        return embeds[:1], embeds[1:]

    def after_step(self) -> None:
        with torch.no_grad():
            table = self.text_encoder.get_input_embeddings().weight
            table[self.keep] = self.original[self.keep]

    def extra_modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.text_encoder,)

    def result_view(self) -> SDModel:
        info = {**self.model.info, "attack": self.name, "token": self.token}
        return dataclasses.replace(
            self.model, text_encoder=self.text_encoder, tokenizer=self.tokenizer, info=info, _fingerprint=None
        )

    def learned_embeds(self) -> torch.Tensor:
        return self.text_encoder.get_input_embeddings().weight[self.token_ids].detach().cpu().clone()

    def save(self, result: AttackResult, folder: Path) -> None:
        """learned_embeds.safetensors ({token: (vectors, dim)}), loadable with ``load_textual_inversion``."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({self.token: self.learned_embeds()}, str(folder / "learned_embeds.safetensors"))

    @classmethod
    def load(cls, model: SDModel, folder: Path, cfg: AttackConfig) -> tuple[SDModel, dict[str, str]]:
        """The model with the learned token from ``folder`` (copies of the tokenizer and text encoder)."""
        attacked = dataclasses.replace(
            model,
            tokenizer=copy.deepcopy(model.tokenizer),
            text_encoder=copy.deepcopy(model.text_encoder),
            _fingerprint=None,
        )
        attacked.pipeline().load_textual_inversion(str(folder))
        return attacked, {cfg.identifier: cfg.ti_token or f"<{cfg.identifier}>"}
