"""A protected export carries what its protection was measured to resist: the records of the protection
tests run on it (safetensors metadata / apdm_measured.json) and a model card (README.md in a folder,
<name>.md beside a single file); `apdm inspect` and `apdm compare` print the records back."""

from __future__ import annotations

import json

import pytest
from ldm_layout import make_checkpoint, write_config_folder
from safetensors import safe_open

from apdm_core.attack import AttackConfig
from apdm_core.card import card_path, format_measured
from apdm_core.cli import main
from apdm_core.evaluate import EvalConfig, compare
from apdm_core.export import read_measured, write_model
from apdm_core.loading import load_model
from apdm_core.protection import protect


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    return make_checkpoint(root / "sd1.safetensors", "sd1"), write_config_folder(root / "sd1-cfg", "sd1")


def test_a_tested_protection_is_exported_with_its_measurements_and_card(fast_config, sd1, subject_dir, tmp_path,
                                                                         capsys):  # fmt: skip
    ckpt, cfg = sd1
    config = fast_config(
        model=str(ckpt), model_type=str(cfg), outer_steps=1, inner_steps=1, num_class_images=1
    )
    result = protect(config)
    base = load_model(ckpt, model_type=str(cfg))
    attack = AttackConfig(kind="dreambooth", steps=2, lr=1e-3, num_class_images=1, sample_steps=1, device="cpu",
                          cache_dir=str(tmp_path / "c"), instance_prompt=config.instance_prompt,
                          class_prompt=config.class_prompt)  # fmt: skip
    ev = EvalConfig(num_samples=2, eval_steps=2, metrics=["denoise"], utility_samples=2)
    compare(base, result.model, subject_dir, attack, ev)
    (record,) = result.model.info["measured"]
    assert record["attack"]["kind"] == "dreambooth" and record["attack"]["steps"] == 2
    assert set(record["metrics"]["denoise"]) >= {"unattacked", "unprotected", "protected", "efficiency"}
    assert [u["prompt"] for u in record["utility"]] == ["a photo of person", "a photo of a house"]
    assert "sks" not in json.dumps(record)  # no prompt with the identifier

    single = tmp_path / "protected.safetensors"
    write_model(result.model, single, config=config)
    with safe_open(str(single), framework="pt") as f:
        assert json.loads(f.metadata()["apdm.measured"]) == [record]
    card = card_path(single).read_text(encoding="utf-8")
    assert card_path(single) == tmp_path / "protected.md"
    assert (
        card.startswith("---\nlibrary_name: diffusers")
        and "## Measured" in card
        and "| dreambooth 2 steps" in card
    )
    assert str(tmp_path) not in card and "sks" not in card

    folder = tmp_path / "protected_folder"
    write_model(result.model, folder, config=config)
    assert read_measured(folder) == [record] and (folder / "README.md").is_file()
    assert read_measured(single) == [record]

    assert main(["inspect", str(single), "--model-type", str(cfg)]) == 0
    assert "measured to resist" in capsys.readouterr().out
    out = tmp_path / "report"
    argv = ["compare", "--base", str(ckpt), "--protected", str(single), "--images", str(subject_dir), "--out", str(out),
            "--model-type", str(cfg), "--steps", "1", "--num-class-images", "1", "--sample-steps", "1", "--device", "cpu",
            "--num-samples", "1", "--eval-steps", "1", "--metrics", "denoise", "--utility-samples", "1",
            "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.index("measured to resist") < printed.index("Protection test")  # printed back first
    assert format_measured([]) == ""


def test_an_untested_export_says_so(fast_config, tmp_path):
    config = fast_config(outer_steps=1, inner_steps=1, output=str(tmp_path / "out"))
    protect(config)
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "No protection test was run" in card and "protected with APDM" in card
    assert read_measured(tmp_path / "out") == []


def test_a_protected_file_presents_itself_the_standard_way(fast_config, tmp_path):
    """ModelSpec keys (what hosts and trainers read): the architecture, prediction type and date set, the
    source's author kept, its title replaced by one that says the file is protected."""
    source = make_checkpoint(tmp_path / "src.safetensors", "sd1",
                             metadata={"modelspec.title": "Dreamy Mix", "modelspec.author": "someone"})  # fmt: skip
    cfg_dir = write_config_folder(tmp_path / "cfg", "sd1")
    out = tmp_path / "protected.safetensors"
    protect(fast_config(model=str(source), model_type=str(cfg_dir), output=str(out), outer_steps=1, inner_steps=1,
                        num_class_images=1))  # fmt: skip
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert (
        meta["modelspec.title"] == "Dreamy Mix (protected with APDM)"
        and meta["modelspec.author"] == "someone"
    )
    assert (
        meta["modelspec.sai_model_spec"] == "1.0.0"
        and meta["modelspec.architecture"] == "stable-diffusion-v1"
    )
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.date"] == meta["apdm.created"]
    assert (
        "4 subject" not in meta["modelspec.description"] and "1 subject(s)" in meta["modelspec.description"]
    )
    converted = tmp_path / "converted.safetensors"
    assert (
        main(["export", "--model", str(source), "--model-type", str(cfg_dir), "--out", str(converted)]) == 0
    )
    with safe_open(str(converted), framework="pt") as f:
        assert f.metadata()["modelspec.title"] == "Dreamy Mix"  # a conversion is not a protection
