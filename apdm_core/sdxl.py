"""SDXL conditioning as one tensor per sample, so every loop of the engine takes SDXL unchanged.

An SD1.x/SD2.x UNet is conditioned on the text encoder's token states (N, 77, D). SDXL adds two
vectors per sample (``added_cond_kwargs``): the pooled embedding of its second text encoder and
six size/crop ids (original height/width, crop top/left, target height/width). The engine's
loops (the protection's pairs and terms, the simulated attacker, the real attacks, the metrics)
handle the conditioning as one tensor that they expand, concatenate and slice along the batch;
so for SDXL the two vectors ride along as extra rows after the tokens: ``pack`` writes
[pooled | time ids] into ``rows`` extra token rows (zero padded), ``unpack`` reads them back
right before the UNet is called (``unet_call``). How many rows follows from the UNet's config
(``projection_class_embeddings_input_dim`` = pooled + 6 x ``addition_time_embed_dim``), so
nothing else needs to know the layout.
"""

from __future__ import annotations

import math

import torch

TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)


def unet_config(unet) -> dict:
    """The diffusers config of ``unet``, also through DDP/compile/PEFT wrappers."""
    seen = 0
    while unet is not None and seen < 6:
        cfg = getattr(unet, "config", None)
        if cfg is not None and hasattr(cfg, "get") and "in_channels" in cfg:
            return cfg
        unet = (
            getattr(unet, "module", None) or getattr(unet, "_orig_mod", None) or getattr(unet, "model", None)
        )
        seen += 1
    return {}


def pooled_dim(cfg) -> int:
    return int(cfg["projection_class_embeddings_input_dim"]) - TIME_IDS * int(cfg["addition_time_embed_dim"])


def extra_rows(cfg) -> int:
    """Token rows that carry [pooled | time ids] (0 for a UNet without SDXL's added conditioning)."""
    if cfg.get("addition_embed_type") != "text_time":
        return 0
    return math.ceil((pooled_dim(cfg) + TIME_IDS) / int(cfg["cross_attention_dim"]))


def time_ids(size: int | tuple[int, int], n: int = 1) -> torch.Tensor:
    """SDXL's size/crop ids for a square (or (h, w)) image seen whole: (h, w, 0, 0, h, w) per sample."""
    h, w = (size, size) if isinstance(size, int) else size
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(n, -1)


def pack(embeds: torch.Tensor, pooled: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(N, L, D) token states + (N, P) pooled + (N, 6) ids -> (N, L + rows, D)."""
    n, _, d = embeds.shape
    vec = torch.cat([pooled.to(embeds), ids.to(embeds)], dim=1)
    rows = math.ceil(vec.shape[1] / d)
    vec = torch.nn.functional.pad(vec, (0, rows * d - vec.shape[1]))
    return torch.cat([embeds, vec.reshape(n, rows, d)], dim=1)


def encode(pipe, prompts: list[str], size: int, device) -> torch.Tensor:
    """The packed conditioning of ``prompts`` as an SDXL pipeline encodes them for sampling (both encoders'
    token states, the pooled embedding), with the size/crop ids of ``size``. Gradients flow (textual
    inversion trains through it); ``SDModel.encode_prompts`` calls it without them."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        list(prompts),
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
    )
    return pack(embeds, pooled, time_ids(size, len(prompts)))


def unpack(cond: torch.Tensor, unet) -> tuple[torch.Tensor, dict | None]:
    """(token states, added_cond_kwargs) for ``unet``; an SD1/SD2 UNet gets ``cond`` as it is."""
    cfg = unet_config(unet)
    rows = extra_rows(cfg)
    if not rows:
        return cond, None
    p = pooled_dim(cfg)
    vec = cond[:, -rows:].reshape(cond.shape[0], -1)
    return cond[:, :-rows], {"text_embeds": vec[:, :p], "time_ids": vec[:, p : p + TIME_IDS]}


def token_states(cond: torch.Tensor, unet) -> torch.Tensor:
    """Only the text tokens of a conditioning (what cross-attention keys and values see)."""
    return unpack(cond, unet)[0]


def unet_call(unet, latents: torch.Tensor, timesteps, cond: torch.Tensor, **kw):
    """``unet(latents, t, encoder_hidden_states=...)`` with SDXL's added conditioning unpacked."""
    states, added = unpack(cond, unet)
    if added is not None:
        kw["added_cond_kwargs"] = added
    return unet(latents, timesteps, encoder_hidden_states=states, return_dict=False, **kw)[0]
