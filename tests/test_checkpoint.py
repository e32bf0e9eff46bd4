"""Single-file checkpoints: tokenizer, shipped configs, detection, loading, export, metadata, safety."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json

import pytest
import safetensors.torch
import torch
from helpers import draw_photo
from ldm_layout import make_checkpoint, write_config_folder
from safetensors import safe_open

from apdm_core.checkpoint import (
    config_dir,
    detect_model_type,
    load_single_file,
    read_checkpoint,
    resolve_model_type,
)
from apdm_core.clip_tokenizer import clip_vocab, load_tokenizer
from apdm_core.errors import APDMError, InputError
from apdm_core.export import check_export, export_single_file, match_subjects, unet_key_map
from apdm_core.loading import load_model

UNET = "model.diffusion_model."


def read_all(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    raw = lambda t: t.reshape(-1).contiguous().view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and raw(a).equal(raw(b))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny SD1 and SD2 checkpoints (fp32 and fp16) with matching tiny config folders."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for family in ("sd1", "sd2"):
        out[family] = make_checkpoint(root / f"{family}.safetensors", family)
        out[f"{family}-cfg"] = write_config_folder(root / f"{family}-cfg", family)
    out["sd1-fp16"] = make_checkpoint(root / "sd1-fp16.safetensors", "sd1", dtype=torch.float16, seed=1)
    out["sd2-v-cfg"] = write_config_folder(root / "sd2-v-cfg", "sd2", v_pred=True)
    return out


# --- tokenizer and shipped configs ------------------------------------------------------------
def test_clip_vocabulary_and_tokenizers_match_stable_diffusion():
    vocab, merges = clip_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    sd1, sd2 = load_tokenizer(config_dir("sd1")), load_tokenizer(config_dir("sd2-v"))
    for tok in (sd1, sd2):
        assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert tok("a photo of sks person").input_ids == [49406, 320, 1125, 539, 48136, 2533, 49407]
    assert sd1.pad_token_id == 49407 and sd2.pad_token_id == 0  # SD2 pads with "!"
    assert sd2("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]


@pytest.mark.parametrize(
    "kind, size, ctx, linear, pred, layers",
    [("sd1", 64, 768, False, "epsilon", 12), ("sd2", 64, 1024, True, "epsilon", 23),
     ("sd2-v", 96, 1024, True, "v_prediction", 23)],
)  # fmt: skip
def test_shipped_config_folders(kind, size, ctx, linear, pred, layers):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from apdm_core.models import _load_scheduler

    folder = config_dir(kind)
    unet = UNet2DConditionModel.load_config(folder, subfolder="unet", local_files_only=True)
    assert (unet["sample_size"], unet["cross_attention_dim"]) == (size, ctx)
    assert unet.get("use_linear_projection", False) == linear and unet["block_out_channels"] == [
        320,
        640,
        1280,
        1280,
    ]
    assert _load_scheduler(folder).config.prediction_type == pred
    assert (
        CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True).num_hidden_layers
        == layers
    )
    assert json.loads((folder / "model_index.json").read_text())["unet"] == [
        "diffusers",
        "UNet2DConditionModel",
    ]


# --- detection ---------------------------------------------------------------------------------
def test_detection_from_tensors_and_hints(files, tmp_path):
    assert detect_model_type(read_checkpoint(files["sd1"])).model_type == "sd1"
    det = detect_model_type(read_checkpoint(files["sd2"]))
    assert det.model_type == "sd2" and "OpenCLIP" in det.reasons[0] and "linear" in det.reasons[1]
    assert "ComfyUI" in det.reasons[2]  # decided by the norm1.bias statistic (std 0.05 <= 0.09)
    hints = {
        "modelspec": {"metadata": {"modelspec.prediction_type": "v"}},
        "arch": {"metadata": {"modelspec.architecture": "stable-diffusion-v2-768-v"}},
        "key": {"extra": {"v_pred": torch.zeros(())}},
    }
    for name, kw in hints.items():
        det = detect_model_type(
            read_checkpoint(make_checkpoint(tmp_path / f"{name}.safetensors", "sd2", **kw))
        )
        assert det.model_type == "sd2-v", name
    big = {f"{UNET}output_blocks.11.1.transformer_blocks.0.norm1.bias": torch.randn(32) * 0.5}
    det = detect_model_type(read_checkpoint(make_checkpoint(tmp_path / "std.safetensors", "sd2", extra=big)))
    assert det.model_type == "sd2-v" and "> 0.09" in det.reasons[-1]


def test_detection_refuses_other_files_with_a_reason(files, tmp_path):
    cases = {
        "sdxl": (
            {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(4)},
            "SDXL",
        ),
        "lora": ({"lora_unet_down_blocks_0.alpha": torch.ones(())}, "LoRA"),
        # named by diffusers' own single-file type inference
        "sdxl_real_keys": (
            {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.ones(4)},
            r"SDXL checkpoint \(diffusers type 'xl_base'\) without its UNet",
        ),
        "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(4)}, "FLUX.1"),
        "unet": ({"conv_in.weight": torch.ones(4, 4, 3, 3)}, "diffusers component"),
    }
    for name, (tensors, msg) in cases.items():
        safetensors.torch.save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(InputError, match=msg):
            detect_model_type(read_checkpoint(tmp_path / f"{name}.safetensors"))
    sd = safetensors.torch.load_file(str(files["sd1"]))
    proj = f"{UNET}input_blocks.1.1.proj_in.weight"
    sd[proj] = sd[proj][:, :, 0, 0].contiguous()  # SD1 text encoder with an SD2-style linear proj_in
    safetensors.torch.save_file(sd, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(InputError, match="mixed model.*--model-type"):
        detect_model_type(read_checkpoint(tmp_path / "mixed.safetensors"))
    with pytest.raises(InputError, match="'sd1' was requested but the file is SD2"):
        resolve_model_type(read_checkpoint(files["sd2"]), "sd1")
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not a model")
    with pytest.raises(InputError, match="neither a safetensors nor"):
        read_checkpoint(tmp_path / "junk.safetensors")


# --- loading -----------------------------------------------------------------------------------
def test_sd1_loads_in_the_original_layout(files):
    model = load_single_file(files["sd1"], model_type=str(files["sd1-cfg"]))
    sd = safetensors.torch.load_file(str(files["sd1"]))
    assert model.kind == "sd1" and model.source == str(files["sd1"]) and model.info["format"] == "safetensors"
    u, v = model.unet, model.vae
    pairs = [  # hand-checked correspondences between the two layouts
        (u.conv_in.weight, f"{UNET}input_blocks.0.0.weight"),
        (u.down_blocks[1].resnets[0].conv_shortcut.weight, f"{UNET}input_blocks.4.0.skip_connection.weight"),
        (u.down_blocks[2].attentions[1].proj_in.weight, f"{UNET}input_blocks.8.1.proj_in.weight"),
        (u.down_blocks[0].downsamplers[0].conv.weight, f"{UNET}input_blocks.3.0.op.weight"),
        (u.mid_block.attentions[0].transformer_blocks[0].attn2.to_k.weight,
         f"{UNET}middle_block.1.transformer_blocks.0.attn2.to_k.weight"),
        (u.up_blocks[0].upsamplers[0].conv.weight, f"{UNET}output_blocks.2.1.conv.weight"),
        (u.up_blocks[1].upsamplers[0].conv.weight, f"{UNET}output_blocks.5.2.conv.weight"),
        (u.up_blocks[3].attentions[2].proj_out.weight, f"{UNET}output_blocks.11.1.proj_out.weight"),
        (u.conv_out.weight, f"{UNET}out.2.weight"),
        (v.decoder.up_blocks[0].resnets[0].conv1.weight, "first_stage_model.decoder.up.3.block.0.conv1.weight"),
        (v.encoder.down_blocks[1].resnets[0].conv_shortcut.weight,
         "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight"),
    ]  # fmt: skip
    for param, key in pairs:
        assert torch.equal(param, sd[key]), key
    attn = v.encoder.mid_block.attentions[0].to_q.weight  # VAE attention: 1x1 conv -> linear
    assert torch.equal(attn, sd["first_stage_model.encoder.mid.attn_1.q.weight"][:, :, 0, 0])
    assert model.tokenizer("a photo of sks person").input_ids[0] == model.tokenizer.bos_token_id
    assert model.prediction_type == "epsilon" and model.native_resolution == 64


def test_sd2_open_clip_and_v_prediction_from_the_config_folder(files):
    model = load_single_file(files["sd2"], model_type=str(files["sd2-v-cfg"]))
    sd = safetensors.torch.load_file(str(files["sd2"]))
    assert model.kind == "sd2-v" and model.prediction_type == "v_prediction"
    layer = model.text_encoder.encoder.layers[1] if hasattr(model.text_encoder, "encoder") else None
    layer = layer or model.text_encoder.text_model.encoder.layers[1]
    qkv = sd["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(layer.self_attn.q_proj.weight, qkv[:32]) and torch.equal(
        layer.self_attn.v_proj.weight, qkv[64:]
    )
    assert len(model.text_encoder.state_dict()) > 0 and model.text_encoder.config.num_hidden_layers == 2


def test_old_clip_key_names_load_and_export_unchanged(files, tmp_path):
    sd = safetensors.torch.load_file(str(files["sd1"]))
    new, old = "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."
    sd = {(old + k[len(new) :] if k.startswith(new) else k): v for k, v in sd.items()}
    source = tmp_path / "old-names.safetensors"
    safetensors.torch.save_file(sd, str(source))
    model = load_single_file(source, model_type=str(files["sd1-cfg"]))
    ref = load_single_file(files["sd1"], model_type=str(files["sd1-cfg"]))
    for a, b in zip(model.text_encoder.state_dict().values(), ref.text_encoder.state_dict().values()):
        assert torch.equal(a, b)
    dst, _ = read_all(export_single_file(model, tmp_path / "out.safetensors"))
    assert set(dst) == set(sd) and all(same_bytes(sd[k], dst[k]) for k in sd)


def test_load_model_dispatches_single_files(files):
    model = load_model(files["sd1"], model_type=str(files["sd1-cfg"]))
    assert model.kind == "sd1" and not any(p.requires_grad for p in model.unet.parameters())


# --- export ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, cfg", [("sd1", "sd1-cfg"), ("sd2", "sd2-cfg"), ("sd1-fp16", "sd1-cfg")])
def test_round_trip_is_identical_when_nothing_was_trained(files, tmp_path, name, cfg):
    model = load_single_file(files[name], model_type=str(files[cfg]))
    out = export_single_file(model, tmp_path / "out.safetensors")
    src, _ = read_all(files[name])
    dst, meta = read_all(out)
    assert list(dst) == list(src)  # same keys, same order
    assert all(same_bytes(src[k], dst[k]) for k in src)  # every tensor byte for byte (fp16 stays fp16)
    assert (
        meta["apdm.protected"] == "false"
        and meta["apdm.source_sha256"] == hashlib.sha256(files[name].read_bytes()).hexdigest()
    )
    again = load_single_file(out, model_type=str(files[cfg]))
    for a, b in zip(model.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_export_replaces_only_the_unet(files, tmp_path, fast_config):
    ema = {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.diffusion_modelinput_blocks00weight": torch.ones(1),
    }
    source = make_checkpoint(tmp_path / "src.safetensors", "sd2", dtype=torch.float16, extra=ema)
    model = load_single_file(source, model_type=str(files["sd2-cfg"]))
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.25)
    config = fast_config(instance_prompt="a photo of Jane Doe")
    out = export_single_file(model, tmp_path / "protected.safetensors", config=config)
    src, _ = read_all(source)
    dst, meta = read_all(out)
    key_map = unet_key_map(read_checkpoint(source), model.unet)
    unet_state = model.unet.state_dict()
    assert set(dst) == set(src) - set(ema)  # the unprotected EMA copy is gone
    for key in dst:
        if key.startswith(UNET):
            assert dst[key].dtype == torch.float16 and not torch.equal(dst[key], src[key])
        else:
            assert same_bytes(src[key], dst[key]), key
    for d, key in key_map.items():
        assert torch.equal(dst[key], unet_state[d].half())
    for kept in (
        "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight",
        "cond_stage_model.model.text_projection",
        "cond_stage_model.model.logit_scale",
        "alphas_cumprod",
    ):
        assert same_bytes(src[kept], dst[kept])  # fmt: skip
    assert dst["alphas_cumprod"].dtype == torch.float32
    assert "model_ema" in meta["apdm.dropped"]
    # metadata: the settings and subjects, never paths, names or the images
    assert meta["apdm.protected"] == "true" and meta["apdm.model_type"] == "sd2"
    cfg = json.loads(meta["apdm.config"])
    assert "images" not in cfg and "model" not in cfg and cfg["outer_steps"] == config.outer_steps
    blob = json.dumps(meta)
    assert "Jane" not in blob and str(tmp_path) not in blob and "img_0" not in blob
    record = json.loads(meta["apdm.subjects"])
    assert record["count"] == 4 and len(record["hashes"]) == 4
    assert all(ok for _, ok in match_subjects(record, config.images))
    assert match_subjects(record, [draw_photo(99)]) == [("image_000", False)]


def test_dtype_can_be_changed_on_request(files, tmp_path):
    model = load_single_file(files["sd1"], model_type=str(files["sd1-cfg"]))
    dst, _ = read_all(export_single_file(model, tmp_path / "half.safetensors", dtype="fp16"))
    assert dst[f"{UNET}out.2.weight"].dtype == torch.float16
    assert dst["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


def test_pickle_is_refused_unless_opted_in(files, tmp_path):
    sd = safetensors.torch.load_file(str(files["sd1"]))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000}, ckpt)
    with pytest.raises(InputError, match="pickle.*--allow-pickle"):
        load_single_file(ckpt, model_type=str(files["sd1-cfg"]))
    model = load_single_file(ckpt, model_type=str(files["sd1-cfg"]), allow_pickle=True)
    assert model.info["format"] == "pickle"
    out = export_single_file(model, tmp_path / "converted.safetensors")
    dst, meta = read_all(out)
    assert all(same_bytes(sd[k], dst[k]) for k in sd) and "global_step" in meta["apdm.dropped"]

    evil = tmp_path / "evil.ckpt"  # any object outside torch's weights_only allow-list
    torch.save({"state_dict": sd, "payload": argparse.Namespace(cmd="rm -rf ~")}, evil)
    with pytest.raises(InputError, match="weights_only=True"):
        read_checkpoint(evil, allow_pickle=True)


def test_existing_outputs_and_the_source_are_never_overwritten(files, tmp_path):
    model = load_single_file(files["sd1"], model_type=str(files["sd1-cfg"]))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(InputError, match="already exists"):
        export_single_file(model, out)
    with pytest.raises(InputError, match="is the input .* itself"):
        export_single_file(model, files["sd1"], overwrite=True)
    with pytest.raises(InputError, match=r"\.safetensors only"):
        export_single_file(model, tmp_path / "out.ckpt")
    assert out.read_bytes() == b"old"


@pytest.mark.parametrize("failure", ["crash", "disk full"])
def test_a_failed_write_leaves_no_partial_file_and_the_old_one_intact(files, tmp_path, monkeypatch, failure):
    model = load_single_file(files["sd1"], model_type=str(files["sd1-cfg"]))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old version")

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        if failure == "disk full":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("crash mid-write")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(APDMError if failure == "disk full" else RuntimeError) as info:
        export_single_file(model, out, overwrite=True)
    if failure == "disk full":
        assert "disk is full" in str(info.value) and "nothing was written" in str(info.value)
    assert out.read_bytes() == b"old version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_a_diffusers_model_needs_a_template_for_single_file_export(files, tmp_path, tiny_model_dir):
    model = load_model(tiny_model_dir)
    with pytest.raises(InputError, match="--template"):
        check_export(model, tmp_path / "x.safetensors")
    check_export(model, tmp_path / "folder")  # a diffusers folder is fine


# --- command line ------------------------------------------------------------------------------
def test_cli_protect_export_and_inspect_single_files(files, tmp_path, fast_config, subject_dir, capsys):
    from apdm_core.cli import main

    cfg = str(files["sd1-cfg"])
    fast_config().save(tmp_path / "fast.json")
    out = tmp_path / "protected.safetensors"
    argv = ["protect", "--config", str(tmp_path / "fast.json"), "--model", str(files["sd1"]), "--model-type", cfg,
            "--outer-steps", "1", "--inner-steps", "1", "--num-class-images", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    src, _ = read_all(files["sd1"])
    dst, meta = read_all(out)
    assert meta["apdm.protected"] == "true" and any(
        not torch.equal(src[k], dst[k]) for k in src if k.startswith(UNET)
    )
    assert all(same_bytes(src[k], dst[k]) for k in src if not k.startswith(UNET))
    capsys.readouterr()

    assert main(["inspect", str(out), "--model-type", cfg, "--subjects", str(subject_dir)]) == 0
    text = capsys.readouterr().out
    assert "type:    sd1" in text and "protected; written by apdm-protect" in text
    assert text.count("PROTECTED in this file") == 4
    assert main(["inspect", str(files["sd2"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "sd2" and info["apdm"] == {} and info["tensors"] > 900

    folder = tmp_path / "as-diffusers"
    assert main(["export", "--model", str(files["sd1"]), "--model-type", cfg, "--out", str(folder)]) == 0
    assert (folder / "unet" / "config.json").exists()
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--template" in capsys.readouterr().err
    back = tmp_path / "back.safetensors"
    assert main(["export", "--model", str(folder), "--template", str(files["sd1"]), "--out", str(back)]) == 0
    rt, _ = read_all(back)
    assert all(same_bytes(src[k], rt[k]) for k in src)  # single file -> diffusers folder -> single file
