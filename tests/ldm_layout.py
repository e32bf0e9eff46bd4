"""Tiny single-file checkpoints in the original CompVis/LDM key layout, built for the tests.

The layout is written out here independently of diffusers (it follows the module tree of
the original ``ldm`` code: openaimodel.UNetModel, autoencoder Encoder/Decoder, OpenCLIP's
text transformer), so loading these files through diffusers' conversion checks the loader
against the real layout. The block topology is SD's (4 levels, 2 res blocks per level,
cross-attention on the first three, SD2's linear proj_in and 24-layer-style OpenCLIP with
the extra last block) with tiny channels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from apdm_core.tiny import write_clip_tokenizer

UNET, VAE = "model.diffusion_model.", "first_stage_model."
SD_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
SD_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
TEXT_DIM, TEXT_LAYERS, VOCAB = 32, 2, 540


def tiny_configs(family: str, v_pred: bool = False) -> dict:
    sd2 = family == "sd2"
    return {
        "unet": {"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
                 "layers_per_block": 2, "block_out_channels": [16, 32, 32, 32], "down_block_types": SD_DOWN,
                 "up_block_types": SD_UP, "cross_attention_dim": TEXT_DIM, "norm_num_groups": 4,
                 "attention_head_dim": [2, 4, 4, 4] if sd2 else 2, "use_linear_projection": sd2},
        "vae": {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
                "block_out_channels": [8, 16, 16, 16], "layers_per_block": 2, "norm_num_groups": 4,
                "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                "sample_size": 64},
        "text": {"hidden_size": TEXT_DIM, "intermediate_size": 2 * TEXT_DIM, "num_hidden_layers": TEXT_LAYERS,
                 "num_attention_heads": 4, "max_position_embeddings": 77,
                 "hidden_act": "gelu" if sd2 else "quick_gelu"},
        "scheduler": {"_class_name": "DDIMScheduler" if v_pred else "PNDMScheduler", "num_train_timesteps": 1000,
                      "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                      "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                      "prediction_type": "v_prediction" if v_pred else "epsilon"},
    }  # fmt: skip


TEXT2_DIM, XL_TIME_DIM = 48, 8
XL_TEXT1, XL_TEXT2 = "conditioner.embedders.0.transformer.text_model", "conditioner.embedders.1.model"


def tiny_xl_configs(v_pred: bool = False) -> dict:
    """SDXL's topology (3 levels, no attention on the first, deeper transformers below, linear proj_in,
    CLIP-L + OpenCLIP-bigG-shaped text encoders, text_time added conditioning) with tiny widths."""
    cfg = tiny_configs("sd1", v_pred)
    cfg["unet"].update(
        block_out_channels=[16, 32, 32],
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
        up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"],
        attention_head_dim=[2, 4, 4],
        transformer_layers_per_block=[1, 1, 2],
        use_linear_projection=True,
        cross_attention_dim=TEXT_DIM + TEXT2_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=XL_TIME_DIM,
        projection_class_embeddings_input_dim=TEXT2_DIM + 6 * XL_TIME_DIM,
    )
    cfg["vae"]["scaling_factor"] = 0.13025
    cfg["text2"] = {
        **cfg["text"],
        "hidden_size": TEXT2_DIM,
        "intermediate_size": 2 * TEXT2_DIM,
        "projection_dim": TEXT2_DIM,
        "hidden_act": "gelu",
    }
    cfg["scheduler"] = {
        "_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": "v_prediction" if v_pred else "epsilon",
    }
    return cfg  # fmt: skip


def write_config_folder(folder: Path, family: str, v_pred: bool = False) -> Path:
    """A diffusers config folder (no weights) for the tiny model: what --model-type accepts."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    cfg = tiny_xl_configs(v_pred) if family == "sdxl" else tiny_configs(family, v_pred)
    for sub, name in (
        ("unet", "config.json"),
        ("vae", "config.json"),
        ("scheduler", "scheduler_config.json"),
    ):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / name).write_text(json.dumps(cfg[sub]), encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer"))
    assert len(tok) <= VOCAB
    special = dict(vocab_size=VOCAB, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)  # fmt: skip
    CLIPTextConfig(**cfg["text"], **special).save_pretrained(folder / "text_encoder")
    if family == "sdxl":
        write_clip_tokenizer(folder / "tokenizer_2")
        CLIPTextConfig(**cfg["text2"], **special).save_pretrained(folder / "text_encoder_2")
    return folder


def configs_from_folder(folder: Path) -> dict:
    """The unet/vae/text configs of a diffusers config folder, in the form ``make_checkpoint`` takes."""
    read = lambda sub, name="config.json": json.loads((Path(folder) / sub / name).read_text(encoding="utf-8"))  # noqa: E731
    out = {"unet": read("unet"), "vae": read("vae"), "text": read("text_encoder")}
    if (Path(folder) / "text_encoder_2").is_dir():
        out["text2"] = read("text_encoder_2")
    return out


class Layout:
    """Collects (key -> shape) while walking the original module tree."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}

    def add(self, name: str, *shape: int) -> None:
        self.shapes[name] = tuple(shape)

    def linear(self, name: str, i: int, o: int, bias: bool = True) -> None:
        self.add(f"{name}.weight", o, i)
        if bias:
            self.add(f"{name}.bias", o)

    def conv(self, name: str, i: int, o: int, k: int = 3) -> None:
        self.add(f"{name}.weight", o, i, k, k)
        self.add(f"{name}.bias", o)

    def norm(self, name: str, c: int) -> None:
        self.add(f"{name}.weight", c)
        self.add(f"{name}.bias", c)


def unet_layout(cfg: dict, lay: Layout) -> None:
    """openaimodel.UNetModel: time_embed, input_blocks, middle_block, output_blocks, out."""
    boc, nrb, ctx = cfg["block_out_channels"], cfg["layers_per_block"], cfg["cross_attention_dim"]
    linear_proj, emb = cfg.get("use_linear_projection", False), 4 * boc[0]
    attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    depth = cfg.get("transformer_layers_per_block", 1)
    depth = depth if isinstance(depth, list) else [depth] * len(boc)
    P = UNET

    def res(n: str, i: int, o: int) -> None:  # ResBlock
        lay.norm(f"{n}.in_layers.0", i)
        lay.conv(f"{n}.in_layers.2", i, o)
        lay.linear(f"{n}.emb_layers.1", emb, o)
        lay.norm(f"{n}.out_layers.0", o)
        lay.conv(f"{n}.out_layers.3", o, o)
        if i != o:
            lay.conv(f"{n}.skip_connection", i, o, 1)

    def transformer(n: str, c: int, d: int = 1) -> None:  # SpatialTransformer with d BasicTransformerBlocks
        lay.norm(f"{n}.norm", c)
        for proj in ("proj_in", "proj_out"):
            (lay.linear(f"{n}.{proj}", c, c) if linear_proj else lay.conv(f"{n}.{proj}", c, c, 1))
        for i in range(d):
            block(f"{n}.transformer_blocks.{i}", c)

    def block(b: str, c: int) -> None:
        for a, kv in (("attn1", c), ("attn2", ctx)):
            lay.linear(f"{b}.{a}.to_q", c, c, bias=False)
            lay.linear(f"{b}.{a}.to_k", kv, c, bias=False)
            lay.linear(f"{b}.{a}.to_v", kv, c, bias=False)
            lay.linear(f"{b}.{a}.to_out.0", c, c)
        lay.linear(f"{b}.ff.net.0.proj", c, 8 * c)  # GEGLU
        lay.linear(f"{b}.ff.net.2", 4 * c, c)
        for k in (1, 2, 3):
            lay.norm(f"{b}.norm{k}", c)

    lay.linear(f"{P}time_embed.0", boc[0], emb)
    lay.linear(f"{P}time_embed.2", emb, emb)
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text + size/crop ids
        lay.linear(f"{P}label_emb.0.0", cfg["projection_class_embeddings_input_dim"], emb)
        lay.linear(f"{P}label_emb.0.2", emb, emb)
    lay.conv(f"{P}input_blocks.0.0", cfg["in_channels"], boc[0])
    chans, ch, k = [boc[0]], boc[0], 1
    for level, c in enumerate(boc):
        for _ in range(nrb):
            res(f"{P}input_blocks.{k}.0", ch, c)
            ch = c
            if attn[level]:
                transformer(f"{P}input_blocks.{k}.1", ch, depth[level])
            chans.append(ch)
            k += 1
        if level != len(boc) - 1:
            lay.conv(f"{P}input_blocks.{k}.0.op", ch, ch)
            chans.append(ch)
            k += 1
    res(f"{P}middle_block.0", ch, ch)
    transformer(f"{P}middle_block.1", ch, depth[-1])
    res(f"{P}middle_block.2", ch, ch)
    k = 0
    for level in reversed(range(len(boc))):
        for i in range(nrb + 1):
            res(f"{P}output_blocks.{k}.0", ch + chans.pop(), boc[level])
            ch, j = boc[level], 1
            if attn[level]:
                transformer(f"{P}output_blocks.{k}.1", ch, depth[level])
                j = 2
            if level and i == nrb:
                lay.conv(f"{P}output_blocks.{k}.{j}.conv", ch, ch)
            k += 1
    lay.norm(f"{P}out.0", ch)
    lay.conv(f"{P}out.2", ch, cfg["out_channels"])


def vae_layout(cfg: dict, lay: Layout) -> None:
    """autoencoder.AutoencoderKL: encoder, decoder, quant_conv, post_quant_conv."""
    boc, nrb, z = cfg["block_out_channels"], cfg["layers_per_block"], cfg["latent_channels"]

    def res(n: str, i: int, o: int) -> None:  # ResnetBlock
        lay.norm(f"{n}.norm1", i)
        lay.conv(f"{n}.conv1", i, o)
        lay.norm(f"{n}.norm2", o)
        lay.conv(f"{n}.conv2", o, o)
        if i != o:
            lay.conv(f"{n}.nin_shortcut", i, o, 1)

    def mid(n: str, c: int) -> None:
        res(f"{n}.block_1", c, c)
        lay.norm(f"{n}.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):  # AttnBlock: 1x1 convs
            lay.conv(f"{n}.attn_1.{p}", c, c, 1)
        res(f"{n}.block_2", c, c)

    E, D = f"{VAE}encoder", f"{VAE}decoder"
    ch = boc[0]
    lay.conv(f"{E}.conv_in", cfg["in_channels"], ch)
    for i, c in enumerate(boc):
        for j in range(nrb):
            res(f"{E}.down.{i}.block.{j}", ch, c)
            ch = c
        if i != len(boc) - 1:
            lay.conv(f"{E}.down.{i}.downsample.conv", ch, ch)
    mid(f"{E}.mid", ch)
    lay.norm(f"{E}.norm_out", ch)
    lay.conv(f"{E}.conv_out", ch, 2 * z)
    lay.conv(f"{VAE}quant_conv", 2 * z, 2 * z, 1)
    lay.conv(f"{VAE}post_quant_conv", z, z, 1)
    ch = boc[-1]
    lay.conv(f"{D}.conv_in", z, ch)
    mid(f"{D}.mid", ch)
    for i in reversed(range(len(boc))):
        for j in range(nrb + 1):
            res(f"{D}.up.{i}.block.{j}", ch, boc[i])
            ch = boc[i]
        if i != 0:
            lay.conv(f"{D}.up.{i}.upsample.conv", ch, ch)
    lay.norm(f"{D}.norm_out", ch)
    lay.conv(f"{D}.conv_out", ch, cfg["out_channels"])


def clip_layout(cfg: dict, lay: Layout, T: str = "cond_stage_model.transformer.text_model") -> None:
    """SD1: the Hugging Face CLIPTextModel under cond_stage_model.transformer.text_model."""
    d, inner = cfg["hidden_size"], cfg["intermediate_size"]
    lay.add(f"{T}.embeddings.token_embedding.weight", cfg.get("vocab_size", VOCAB), d)
    lay.add(f"{T}.embeddings.position_embedding.weight", 77, d)
    for i in range(cfg["num_hidden_layers"]):
        L = f"{T}.encoder.layers.{i}"
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            lay.linear(f"{L}.self_attn.{p}", d, d)
        lay.norm(f"{L}.layer_norm1", d)
        lay.linear(f"{L}.mlp.fc1", d, inner)
        lay.linear(f"{L}.mlp.fc2", inner, d)
        lay.norm(f"{L}.layer_norm2", d)
    lay.norm(f"{T}.final_layer_norm", d)


def open_clip_layout(
    cfg: dict, lay: Layout, T: str = "cond_stage_model.model", extra_block: bool = True
) -> None:
    """SD2: OpenCLIP's text tower under cond_stage_model.model (one more block than diffusers keeps)."""
    d, inner = cfg["hidden_size"], cfg["intermediate_size"]
    lay.add(f"{T}.token_embedding.weight", cfg.get("vocab_size", VOCAB), d)
    lay.add(f"{T}.positional_embedding", 77, d)
    for i in range(cfg["num_hidden_layers"] + int(extra_block)):
        R = f"{T}.transformer.resblocks.{i}"
        lay.norm(f"{R}.ln_1", d)
        lay.add(f"{R}.attn.in_proj_weight", 3 * d, d)
        lay.add(f"{R}.attn.in_proj_bias", 3 * d)
        lay.linear(f"{R}.attn.out_proj", d, d)
        lay.norm(f"{R}.ln_2", d)
        lay.linear(f"{R}.mlp.c_fc", d, inner)
        lay.linear(f"{R}.mlp.c_proj", inner, d)
    lay.norm(f"{T}.ln_final", d)
    lay.add(f"{T}.text_projection", d, cfg.get("projection_dim", d))
    lay.add(f"{T}.logit_scale")


def make_checkpoint(
    path: Path,
    family: str = "sd1",
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    configs: dict | None = None,
) -> Path:
    """Write a tiny SD1- or SD2-shaped single-file checkpoint with random weights (``configs``: other sizes)."""
    cfg = configs or (tiny_xl_configs() if family == "sdxl" else tiny_configs(family))
    lay = Layout()
    unet_layout(cfg["unet"], lay)
    vae_layout(cfg["vae"], lay)
    if (
        family == "sdxl"
    ):  # SGM layout: conditioner.embedders.0 (CLIP-L), .1 (OpenCLIP bigG, penultimate layer kept)
        clip_layout(cfg["text"], lay, XL_TEXT1)
        open_clip_layout(cfg["text2"], lay, XL_TEXT2, extra_block=False)
    else:
        (open_clip_layout if family == "sd2" else clip_layout)(cfg["text"], lay)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in lay.shapes.items():
        t = torch.randn(shape, generator=g) * 0.05
        if name.endswith("weight") and len(shape) == 1:  # norm scales around 1
            t = t + 1.0
        tensors[name] = t.to(dtype)
    if family in ("sd1", "sdxl"):
        text = XL_TEXT1 if family == "sdxl" else "cond_stage_model.transformer.text_model"
        tensors[f"{text}.embeddings.position_ids"] = torch.arange(77)[None]
    tensors["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)  # LDM buffers stay float32
    tensors.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path
