"""Textual Inversion: learn the embedding of one new token; every network weight stays frozen.

As diffusers' textual_inversion.py: add the token to a copy of the tokenizer, grow a copy of
the text encoder's embedding table, initialise the new row(s) from an existing word, train the
embedding table and put every other row back after each step. Prompts then use the new token
(``sks`` -> ``<sks>``); ``AttackResult.prompt`` rewrites them.

SDXL: the token is learned in both text encoders at once (one row in CLIP ViT-L's table and one in
OpenCLIP bigG's, as kohya's sd-scripts train SDXL embeddings), and saved in the layout A1111, Forge
and ComfyUI load: ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``.
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


class _Encoder:
    """One text encoder's copy with the new token row(s): its tokenizer, table and the rows kept fixed."""

    def __init__(self, tokenizer, text_encoder, tokens: list[str], init_word: str, token: str) -> None:
        self.tokenizer = copy.deepcopy(tokenizer)
        if self.tokenizer.add_tokens(tokens) != len(tokens):
            raise InputError(
                f"The tokenizer already knows {token!r}; choose a new token with --ti-token (e.g. '<sks-x>')."
            )
        self.token_ids = self.tokenizer.convert_tokens_to_ids(tokens)
        init_ids = self.tokenizer(init_word, add_special_tokens=False).input_ids
        if not init_ids:
            raise InputError(f"--ti-init-word {init_word!r} has no tokens; use a word such as 'person'.")
        self.text_encoder = copy.deepcopy(text_encoder).requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # resizing draws random rows: keep the caller's RNG
            try:  # the new rows are overwritten below: skip transformers' mean/covariance init
                self.text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
            except TypeError:  # transformers < 4.46
                self.text_encoder.resize_token_embeddings(len(self.tokenizer))
        table = self.table
        with torch.no_grad():
            table[self.token_ids] = table[init_ids].mean(dim=0, keepdim=True).to(table.dtype)
        table.requires_grad_(True)
        self.original = table.detach().clone()
        self.keep = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
        self.keep[self.token_ids] = False

    @property
    def table(self) -> torch.Tensor:
        return self.text_encoder.get_input_embeddings().weight

    def restore(self) -> None:
        with torch.no_grad():
            self.table[self.keep] = self.original[self.keep]

    def learned(self) -> torch.Tensor:
        return self.table[self.token_ids].detach().cpu().clone()


@register_attack("textual_inversion")
class TextualInversionAttack(Attack):
    defaults = {"steps": 2000, "lr": 5e-3, "prior_weight": 0.0}

    def __init__(self, model: SDModel, cfg: AttackConfig, device: torch.device) -> None:
        super().__init__(model, cfg, device)
        self.token = cfg.ti_token or f"<{cfg.identifier}>"
        self.tokens = [self.token] + [f"{self.token}_{i}" for i in range(1, cfg.ti_vectors)]
        init_word = cfg.ti_init_word or cfg.class_noun
        pairs = [(model.tokenizer, model.text_encoder)] + (
            [(model.tokenizer_2, model.text_encoder_2)] if model.is_xl else []
        )
        self.encoders = [_Encoder(tok, te, self.tokens, init_word, self.token) for tok, te in pairs]
        first = self.encoders[0]
        self.tokenizer, self.text_encoder, self.token_ids = (
            first.tokenizer,
            first.text_encoder,
            first.token_ids,
        )
        self.ids = None
        self._pipe = None

    @property
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        names = ("token_embedding", "token_embedding_2")
        return {name: e.table for name, e in zip(names, self.encoders)}

    def prompt_map(self) -> dict[str, str]:
        """sks -> <sks>: the diffusers pipeline expands a multi-vector token to <sks> <sks>_1 ... itself."""
        return {self.cfg.identifier: self.token}

    def training_prompt(self) -> str:
        return replace_word(self.cfg.instance_prompt, self.cfg.identifier, " ".join(self.tokens))

    def prompt_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Recomputed every step through the text encoder(s): the gradient reaches the new row(s)."""
        if self.model.is_xl:  # the pipeline's own SDXL encoding (both encoders, pooled, ids), with gradients
            from ...sdxl import encode

            if self._pipe is None:  # over the trained copies, whose tables change in place
                self._pipe = self.result_view().pipeline()
            prompt = replace_word(
                self.cfg.instance_prompt, self.cfg.identifier, self.token
            )  # the pipeline expands it
            size = self.cfg.resolution or self.model.native_resolution
            packed = encode(self._pipe, [prompt, self.cfg.class_prompt], size, self.text_encoder.device)
            return packed[:1], packed[1:]
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
        for e in self.encoders:
            e.restore()

    def extra_modules(self) -> tuple[torch.nn.Module, ...]:
        return tuple(e.text_encoder for e in self.encoders)

    def result_view(self) -> SDModel:
        info = {**self.model.info, "attack": self.name, "token": self.token}
        xl = {}
        if self.model.is_xl:
            xl = {"text_encoder_2": self.encoders[1].text_encoder, "tokenizer_2": self.encoders[1].tokenizer}
        return dataclasses.replace(
            self.model,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            info=info,
            _fingerprint=None,
            **xl,
        )

    def learned_embeds(self) -> torch.Tensor:
        return self.encoders[0].learned()

    def save(self, result: AttackResult, folder: Path) -> None:
        """learned_embeds.safetensors, loadable with ``load_textual_inversion``: {token: (vectors, dim)};
        SDXL: {"clip_l": ..., "clip_g": ...} (the layout A1111/Forge/ComfyUI read for SDXL embeddings)."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        if self.model.is_xl:
            tensors = {"clip_l": self.encoders[0].learned(), "clip_g": self.encoders[1].learned()}
        else:
            tensors = {self.token: self.learned_embeds()}
        save_file(tensors, str(folder / "learned_embeds.safetensors"))

    @classmethod
    def load(cls, model: SDModel, folder: Path, cfg: AttackConfig) -> tuple[SDModel, dict[str, str]]:
        """The model with the learned token from ``folder`` (copies of the tokenizer(s) and text encoder(s))."""
        token = cfg.ti_token or f"<{cfg.identifier}>"
        xl = {}
        if model.is_xl:
            xl = {
                "tokenizer_2": copy.deepcopy(model.tokenizer_2),
                "text_encoder_2": copy.deepcopy(model.text_encoder_2),
            }
        attacked = dataclasses.replace(
            model,
            tokenizer=copy.deepcopy(model.tokenizer),
            text_encoder=copy.deepcopy(model.text_encoder),
            _fingerprint=None,
            **xl,
        )
        pipe = attacked.pipeline()
        if not model.is_xl:
            pipe.load_textual_inversion(str(folder))
            return attacked, {cfg.identifier: token}
        from safetensors.torch import load_file

        state = load_file(str(folder / "learned_embeds.safetensors"))
        for key, te, tok in (("clip_l", attacked.text_encoder, attacked.tokenizer),
                             ("clip_g", attacked.text_encoder_2, attacked.tokenizer_2)):  # fmt: skip
            pipe.load_textual_inversion(state[key], token=token, text_encoder=te, tokenizer=tok)
        return attacked, {cfg.identifier: token}
