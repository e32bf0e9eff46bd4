"""SDXL: shipped configs, detection and refusals, single-file and folder loading, the packed conditioning,
protect -> export -> reload, the attacks (textual inversion over both encoders), the CLI and the hosts."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from ldm_layout import UNET, XL_TEXT1, XL_TEXT2, make_checkpoint, write_config_folder
from safetensors import safe_open

from apdm_core.attack import AttackConfig, load_attack_output, run_attack
from apdm_core.checkpoint import (
    config_dir,
    detect_model_type,
    load_single_file,
    read_checkpoint,
    resolve_model_type,
)
from apdm_core.config import ProtectConfig
from apdm_core.errors import InputError
from apdm_core.export import unet_key_map
from apdm_core.loading import load_model
from apdm_core.protection import protect
from apdm_core.sdxl import pack, time_ids, unet_call, unpack
from apdm_core.tiny import build_tiny_xl_model


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    root = tmp_path_factory.mktemp("xl")
    return {
        "file": make_checkpoint(root / "xl.safetensors", "sdxl"),
        "cfg": write_config_folder(root / "xl-cfg", "sdxl"),
        "folder": build_tiny_xl_model(root / "xl-folder").source,
        "root": root,
    }


def fast(**kw):
    values = dict(outer_steps=2, inner_steps=2, num_class_images=2, sample_steps=2, guidance_scale=2.0,
                  lr_protect=1e-4, lr_personalize=1e-4, device="cpu", save_every=0)  # fmt: skip
    return {**values, **kw}


# --- shipped configs, detection, refusals ----------------------------------------------------------------
def test_shipped_sdxl_configs_have_sdxl_base_sizes():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from apdm_core.clip_tokenizer import load_tokenizer
    from apdm_core.models import _load_scheduler

    folder = config_dir("sdxl")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 2567  # SDXL base: 2.567 B parameters
    te2 = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2", local_files_only=True)
    assert (te2.hidden_size, te2.num_hidden_layers, te2.projection_dim) == (1280, 32, 1280)
    assert unet.config.cross_attention_dim == 768 + 1280 and unet.config.sample_size * 8 == 1024
    tok, tok2 = load_tokenizer(folder), load_tokenizer(folder, "tokenizer_2")
    assert (
        tok("a photo of a cat").input_ids
        == tok2("a photo of a cat").input_ids
        == [49406, 320, 1125, 539, 320, 2368, 49407]
    )
    assert (
        tok.pad_token_id == 49407 and tok2.pad_token_id == 0
    )  # CLIP-L pads with <|endoftext|>, bigG with "!"
    assert _load_scheduler(folder).config.prediction_type == "epsilon"
    assert _load_scheduler(config_dir("sdxl-v")).config.prediction_type == "v_prediction"


def test_detection_of_sdxl_and_its_prediction_type(xl, tmp_path):
    det = detect_model_type(read_checkpoint(xl["file"]))
    assert det.model_type == "sdxl" and "OpenCLIP bigG" in det.reasons[0] and "epsilon" in det.reasons[-1]
    hints = {
        "meta": {"metadata": {"modelspec.prediction_type": "v"}},
        "key": {"extra": {"v_pred": torch.zeros(())}},
    }
    for name, kw in hints.items():
        det = detect_model_type(
            read_checkpoint(make_checkpoint(tmp_path / f"{name}.safetensors", "sdxl", **kw))
        )
        assert det.model_type == "sdxl-v", name
    kind, folder, _ = resolve_model_type(read_checkpoint(xl["file"]), "sdxl-v")  # the override
    assert kind == "sdxl-v" and folder == config_dir("sdxl-v")
    with pytest.raises(InputError, match="'sd1' was requested but the file is SDXL.*sdxl or sdxl-v"):
        resolve_model_type(read_checkpoint(xl["file"]), "sd1")
    with pytest.raises(InputError, match="'sdxl' was requested but the file is SD1"):
        resolve_model_type(read_checkpoint(make_checkpoint(tmp_path / "sd1.safetensors", "sd1")), "sdxl")


def test_other_sdxl_files_are_refused_before_any_work(xl, tmp_path):
    state = safetensors.torch.load_file(str(xl["file"]))

    def write(name, tensors):
        safetensors.torch.save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        return read_checkpoint(tmp_path / f"{name}.safetensors")

    refiner = {k.replace(XL_TEXT2, "conditioner.embedders.0.model"): v for k, v in state.items()
               if not k.startswith(XL_TEXT1)}  # fmt: skip
    inpaint = dict(state)
    w = inpaint[f"{UNET}input_blocks.0.0.weight"]
    inpaint[f"{UNET}input_blocks.0.0.weight"] = torch.cat([w, w, w[:, :1]], dim=1).contiguous()  # 9 channels
    cases = {
        "refiner": (refiner, "SDXL refiner.*protect the SDXL base"),
        "inpaint": (inpaint, "9 input channels.*SDXL inpainting"),
        "no_text": ({k: v for k, v in state.items() if not k.startswith(XL_TEXT2)}, "without its text encoder.*OpenCLIP bigG"),
        "no_texts": ({k: v for k, v in state.items() if not k.startswith("conditioner.")},
                     "without its text encoders.*CLIP ViT-L.*and.*OpenCLIP"),
        "vae_only": ({k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")},
                     "a VAE file"),
        "controlnet": ({"control_model." + k[len(UNET):]: v for k, v in state.items() if k.startswith(UNET)},
                       "ControlNet"),
        "text_only": ({k: v for k, v in state.items() if k.startswith("conditioner.")}, "SDXL model.*pass the full"),
    }  # fmt: skip
    for name, (tensors, msg) in cases.items():
        with pytest.raises(InputError, match=msg):
            detect_model_type(write(name, tensors))


# --- loading, conditioning ---------------------------------------------------------------------------
def test_single_file_loads_every_component_from_its_tensors(xl):
    model = load_single_file(xl["file"], model_type=str(xl["cfg"]))
    assert model.kind == "sdxl" and model.is_xl and model.info["format"] == "safetensors"
    with safe_open(str(xl["file"]), "pt") as f:
        proj = f.get_tensor(f"{XL_TEXT2}.text_projection")
        tok = f.get_tensor(f"{XL_TEXT1}.embeddings.token_embedding.weight")
        ckpt = read_checkpoint(xl["file"])
        key_map = unet_key_map(ckpt, model.unet)
        unet_file = {d: f.get_tensor(src) for d, src in key_map.items()}
    assert torch.equal(
        model.text_encoder_2.text_projection.weight, proj.T
    )  # OpenCLIP (d, p) -> Linear (p, d)
    assert torch.equal(model.text_encoder.get_input_embeddings().weight, tok)
    assert "add_embedding.linear_1.weight" in key_map and key_map["add_embedding.linear_1.weight"].endswith(
        "label_emb.0.0.weight"
    )
    assert all(torch.equal(v, unet_file[k]) for k, v in model.unet.state_dict().items())


def test_conditioning_packs_the_pooled_embedding_and_size_ids(xl):
    model = load_model(xl["folder"])
    assert model.is_xl and model.native_resolution == 64
    cond = model.encode_prompts(["a photo of sks dog", "a photo of dog"])
    states, added = unpack(cond, model.unet)
    assert states.shape == (2, 77, 80) and cond.shape[1] == 78  # 48 pooled + 6 ids fit one extra row of 80
    assert torch.equal(added["time_ids"], time_ids(64, 2))
    assert unpack(model.encode_prompts(["a dog"], size=48), model.unet)[1]["time_ids"].tolist() == [
        [48, 48, 0, 0, 48, 48]
    ]
    pipe = model.pipeline()
    embeds, _, pooled, _ = pipe.encode_prompt(
        ["a photo of dog"], device="cpu", do_classifier_free_guidance=False
    )
    assert torch.allclose(states[1:], embeds, atol=1e-6) and torch.allclose(
        added["text_embeds"][1:], pooled, atol=1e-6
    )
    latents, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    direct = model.unet(latents, t, encoder_hidden_states=states, added_cond_kwargs=added).sample
    assert torch.equal(unet_call(model.unet, latents, t, cond), direct)
    big = pack(torch.zeros(1, 3, 4), torch.arange(5.0)[None], torch.ones(1, 6))  # 11 values in rows of 4
    assert big.shape == (1, 6, 4) and big[0, 3:].flatten()[:11].tolist() == [0, 1, 2, 3, 4] + [1] * 6


# --- protect, export, attacks ----------------------------------------------------------------------------
def test_protect_exports_an_sdxl_single_file_that_reloads_bit_exact(xl, subject_dir, tmp_path):
    out = tmp_path / "prot.safetensors"
    result = protect(ProtectConfig(model=str(xl["file"]), model_type=str(xl["cfg"]), images=[str(subject_dir)],
                                   cache_dir=str(tmp_path / "cache"), output=str(out), **fast()))  # fmt: skip
    assert result.model.is_xl and len(result.history) == 2
    source, written = read_checkpoint(xl["file"]), read_checkpoint(out)
    assert set(written.keys()) == set(source.keys())  # the source's layout, every key kept
    assert written.metadata["apdm.model_type"] == "sdxl" and written.metadata[
        "modelspec.architecture"
    ].startswith("stable-diffusion-xl")
    with safe_open(str(out), "pt") as f, safe_open(str(xl["file"]), "pt") as g:  # only UNet tensors changed
        changed = {k for k in f.keys() if not torch.equal(f.get_tensor(k), g.get_tensor(k))}
    assert changed and all(k.startswith(UNET) for k in changed)
    again = load_model(out, model_type=str(xl["cfg"]))
    assert again.is_xl and again.kind == "sdxl"
    mine = result.model.unet.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in again.unet.state_dict().items())
    assert (tmp_path / "prot.md").exists()


def test_protect_a_diffusers_folder_writes_an_sdxl_folder(xl, subject_dir, tmp_path):
    out = tmp_path / "prot"
    protect(ProtectConfig(model=xl["folder"], images=[str(subject_dir)], cache_dir=str(tmp_path / "cache"),
                          output=str(out), **fast(outer_steps=1)))  # fmt: skip
    for sub in ("text_encoder_2", "tokenizer_2", "unet"):
        assert (out / sub).is_dir()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert load_model(out).is_xl and (out / "apdm_config.json").exists()


@pytest.mark.parametrize("kind", ["dreambooth", "lora", "textual_inversion"])
def test_attacks_personalize_an_sdxl_model(xl, subject_dir, tmp_path, kind):
    model = load_model(xl["folder"])
    te1 = model.text_encoder.get_input_embeddings().weight.detach().clone()
    cfg = AttackConfig(kind=kind, steps=2, num_class_images=2, sample_steps=2, guidance_scale=2.0, lr=1e-3,
                       device="cpu", cache_dir=str(tmp_path / "cache"), save_every=0, output=str(tmp_path / kind))  # fmt: skip
    result = run_attack(model, subject_dir, cfg)
    assert result.steps_done == 2 and result.model.is_xl
    reloaded, prompts, _ = load_attack_output(model, tmp_path / kind)
    assert reloaded.is_xl
    if kind == "textual_inversion":  # one new row in each encoder, loaded back into both
        state = safetensors.torch.load_file(str(tmp_path / kind / "learned_embeds.safetensors"))
        assert state["clip_l"].shape == (1, 32) and state["clip_g"].shape == (1, 48)
        for te, tok, key in ((reloaded.text_encoder, reloaded.tokenizer, "clip_l"),
                             (reloaded.text_encoder_2, reloaded.tokenizer_2, "clip_g")):  # fmt: skip
            row = tok.convert_tokens_to_ids(prompts["sks"])
            assert torch.equal(te.get_input_embeddings().weight[row], state[key][0])
        init = model.tokenizer("person", add_special_tokens=False).input_ids
        assert not torch.equal(state["clip_l"][0], te1[init].mean(0))  # it learned
        assert torch.equal(model.text_encoder.get_input_embeddings().weight, te1)  # the input model is intact


def test_cli_protects_an_sdxl_checkpoint(xl, subject_dir, tmp_path):
    from apdm_core.cli import main

    out = tmp_path / "cli.safetensors"
    argv = ["protect", "--model", str(xl["file"]), "--model-type", str(xl["cfg"]), "--images", str(subject_dir),
            "--output", str(out), "--cache-dir", str(tmp_path / "cache"), "--outer-steps", "1", "--inner-steps", "1",
            "--num-class-images", "2", "--sample-steps", "2", "--device", "cpu"]  # fmt: skip
    assert main(argv) in (0, None)
    assert read_checkpoint(out).metadata["apdm.model_type"] == "sdxl"


def test_every_method_and_lever_runs_on_sdxl(xl, subject_dir, tmp_path):
    """PersGuard, the family preset (LoRA episodes), the null-space edit and image-level ASPL on an SDXL
    model: the packed conditioning reaches every loop (the null space sees only the text tokens)."""
    from apdm_core.images.config import ImageProtectConfig
    from apdm_core.images.run import protect_images
    from apdm_core.l2p.nullspace import NullSpace

    base = dict(model=xl["folder"], images=[str(subject_dir)], cache_dir=str(tmp_path / "cache"),
                instance_prompt="a photo of sks dog", class_prompt="a photo of dog", **fast())  # fmt: skip
    r = protect(ProtectConfig(method="persguard", backdoor="target", target_prompt="a photo of cat", **base))
    assert len(r.history) == 2 and r.model.is_xl
    family = ProtectConfig.from_preset(
        "family", **{**base, "outer_steps": 3, "resync_every": 2, "lora_ranks": [2]}
    )
    assert [h["attacker"] for h in protect(family).history] == ["full", "full", "lora-r2"]
    model = load_model(xl["folder"])
    space = NullSpace(model.unet, model.encode_prompts(["a photo of dog"]), 0.99)
    assert space.projection.shape == (80, 80) and 1 <= space.rank <= 77
    out = protect_images(ImageProtectConfig(model=xl["folder"], images=[str(subject_dir)], method="aspl", steps=1,
                                            pgd_steps=1, num_class_images=2, sample_steps=2, device="cpu",
                                            cache_dir=str(tmp_path / "cache"), output=str(tmp_path / "aspl")))  # fmt: skip
    assert len(out.images) == 4
