"""Tiny SD-shaped models built on the fly (tests, the first demo) and a small CLIP tokenizer.

The tokenizer is a real byte-level CLIP BPE tokenizer (vocab.json + merges.txt, loaded with
``CLIPTokenizer.from_pretrained``) over a small vocabulary: every byte is a token, and each
word in ``words`` gets merges so it becomes one token. Unknown words (a new identifier)
fall back to byte tokens, exactly as a rare word does in the real CLIP vocabulary.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .clip_tokenizer import bytes_to_unicode
from .models import SDModel

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_WORDS = ("a", "photo", "of", "sks", "person", "dog", "cat", "portrait", "the", "in")


def write_clip_tokenizer(folder: str | Path, words=DEFAULT_WORDS, max_length: int = 77) -> Path:
    """Write vocab.json/merges.txt/tokenizer_config.json for a small CLIP BPE vocabulary."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = bytes_to_unicode()
    byte_chars = list(table.values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    known = set(vocab_list)
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = [table[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:  # merge left to right: ((a b) c) ...
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in known:
                vocab_list.append(merged)
                known.add(merged)
            symbols = [merged] + symbols[2:]
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2),
        encoding="utf-8",
    )
    return folder


# SD1.x noise schedule (scaled_linear 0.00085 -> 0.012 over 1000 steps).
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def tiny_configs(
    latent_size: int = 8, text_dim: int = 32, vocab_size: int = 1000, prediction_type: str = "epsilon"
) -> dict:
    """Configs of a tiny SD-shaped model with the real block topology (cross-attention blocks, 8x VAE)."""
    return {
        "unet": {
            "sample_size": latent_size,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": [32, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": text_dim,
            "attention_head_dim": 8,
            "norm_num_groups": 8,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [8, 16, 16, 16],
            "latent_channels": 4,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": latent_size * 8,
        },
        "text_encoder": {
            "vocab_size": vocab_size,
            "hidden_size": text_dim,
            "intermediate_size": 2 * text_dim,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
        },
        "scheduler": {
            **SD_SCHEDULE,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "prediction_type": prediction_type,
        },
    }


def build_tiny_model(
    folder: str | Path | None = None,
    *,
    seed: int = 0,
    latent_size: int = 8,
    prediction_type: str = "epsilon",
    words=DEFAULT_WORDS,
    configs: dict | None = None,
) -> SDModel:
    """A randomly initialised tiny SD model; saved as a diffusers folder when ``folder`` is given."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tokenizer", words))
    cfg = configs or tiny_configs(latent_size, vocab_size=len(tokenizer), prediction_type=prediction_type)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    te_cfg = CLIPTextConfig(
        **cfg["text_encoder"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(te_cfg)
    scheduler = DDIMScheduler(**cfg["scheduler"])
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False).eval()
    model = SDModel(unet, vae, text_encoder, tokenizer, scheduler, kind="tiny")
    if folder is not None:
        folder = Path(folder)
        model.pipeline().save_pretrained(folder, safe_serialization=True)
        write_clip_tokenizer(folder / "tokenizer", words)  # vocab.json/merges.txt for slow tokenizers too
        (folder / "apdm_tiny.json").write_text(
            json.dumps({"seed": seed, "note": "random tiny model"}), encoding="utf-8"
        )
        model.source = str(folder)
    return model


def tiny_xl_configs(latent_size: int = 8, vocab_size: int = 1000, prediction_type: str = "epsilon") -> dict:
    """Configs of a tiny SDXL-shaped model: SDXL's topology (no attention at the first level, linear
    proj_in, two text encoders whose token states are concatenated, the pooled embedding and the six
    size/crop ids added to the time embedding) with tiny widths."""
    te1, te2, time_dim = 32, 48, 8
    cfg = tiny_configs(latent_size, te1, vocab_size, prediction_type)
    cfg["unet"].update(
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=te1 + te2,
        use_linear_projection=True,
        transformer_layers_per_block=[1, 2],
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=te2 + 6 * time_dim,
    )
    cfg["vae"]["scaling_factor"] = 0.13025
    cfg["text_encoder_2"] = {
        **cfg["text_encoder"],
        "hidden_size": te2,
        "intermediate_size": 2 * te2,
        "projection_dim": te2,
        "hidden_act": "gelu",
    }
    cfg["scheduler"] = {**SD_SCHEDULE, "steps_offset": 1, "prediction_type": prediction_type,
                        "timestep_spacing": "leading"}  # fmt: skip
    return cfg


def build_tiny_xl_model(
    folder: str | Path | None = None, *, seed: int = 0, latent_size: int = 8, prediction_type: str = "epsilon",
    words=DEFAULT_WORDS, configs: dict | None = None,
) -> SDModel:  # fmt: skip
    """A randomly initialised tiny SDXL-shaped model (``configs``: other sizes, as ``tiny_xl_configs`` gives
    them); saved as a diffusers folder when ``folder`` is given."""
    import tempfile

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tokenizer", words))
    tokenizer_2 = copy.deepcopy(tokenizer)  # the same small vocabulary for both encoders
    cfg = configs or tiny_xl_configs(latent_size, vocab_size=len(tokenizer), prediction_type=prediction_type)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], **special))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"], **special))
    scheduler = EulerDiscreteScheduler(**cfg["scheduler"])
    for m in (unet, vae, text_encoder, text_encoder_2):
        m.requires_grad_(False).eval()
    model = SDModel(unet, vae, text_encoder, tokenizer, scheduler, kind="tiny",
                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)  # fmt: skip
    if folder is not None:
        folder = Path(folder)
        model.pipeline().save_pretrained(folder, safe_serialization=True)
        for sub in ("tokenizer", "tokenizer_2"):
            write_clip_tokenizer(folder / sub, words)
        (folder / "apdm_tiny.json").write_text(
            json.dumps({"seed": seed, "note": "random tiny SDXL-shaped model"}), encoding="utf-8"
        )
        model.source = str(folder)
    return model
