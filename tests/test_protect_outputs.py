"""Every entry point loads single files the same way, and every written model keeps the privacy rules.

protect() loads ``config.model`` with ``config.model_type``; a bad output fails before any
training; the written model records the protected subjects (salted hashes) whether they were
files or in-memory images; a protected diffusers folder holds no local path; ``apdm attack`` /
``evaluate`` / ``compare`` take ``--model-type`` like ``apdm protect``.
"""

from __future__ import annotations

import json

import pytest
from helpers import draw_photo
from ldm_layout import make_checkpoint, write_config_folder
from safetensors import safe_open

import apdm_core.protection as protect_module
from apdm_core.cli import main
from apdm_core.errors import InputError
from apdm_core.export import match_subjects
from apdm_core.protection import protect

TINY = dict(outer_steps=1, inner_steps=1, num_class_images=1)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD1 single-file checkpoint and its diffusers config folder (for --model-type)."""
    root = tmp_path_factory.mktemp("single")
    return make_checkpoint(root / "sd1.safetensors", "sd1"), write_config_folder(root / "sd1-cfg", "sd1")


def metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(protect_module, "prepare_subjects", fail)


# (a) ------------------------------------------------------------------------------------------
def test_protect_loads_a_single_file_as_model_type_says(fast_config, sd1, tmp_path):
    ckpt, cfg = sd1
    with pytest.raises(InputError, match="'sd2' was requested"):  # the type reaches the loader
        protect(fast_config(model=str(ckpt), model_type="sd2", **TINY))
    out = tmp_path / "protected.safetensors"
    result = protect(fast_config(model=str(ckpt), model_type=str(cfg), output=str(out), **TINY))
    assert result.output == out and result.model.kind == "sd1"
    assert metadata(out)["apdm.protected"] == "true"


# (b) ------------------------------------------------------------------------------------------
def test_an_output_that_cannot_be_written_fails_before_training(fast_config, sd1, tmp_path, monkeypatch):
    ckpt, cfg = sd1
    no_training(monkeypatch)
    with pytest.raises(InputError, match="--template"):  # diffusers folder -> single file: no layout
        protect(fast_config(output=str(tmp_path / "x.safetensors")))
    with pytest.raises(InputError, match=r"\.safetensors only"):
        protect(fast_config(model=str(ckpt), model_type=str(cfg), output=str(tmp_path / "x.ckpt")))
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(InputError, match="already exists"):
        protect(fast_config(model=str(ckpt), model_type=str(cfg), output=str(existing)))
    with pytest.raises(InputError, match="input"):  # never over the source, even with overwrite
        protect(fast_config(model=str(ckpt), model_type=str(cfg), output=str(ckpt)), overwrite=True)
    assert existing.read_bytes() == b"keep me"


# (c) ------------------------------------------------------------------------------------------
def test_the_written_model_records_subjects_given_as_images(fast_config, sd1, tmp_path):
    ckpt, cfg = sd1
    photos = [draw_photo(10 + i) for i in range(4)]  # in memory, as hosts pass them; config.images unset
    out = tmp_path / "protected.safetensors"
    protect(
        fast_config(model=str(ckpt), model_type=str(cfg), images=[], output=str(out), **TINY), images=photos
    )
    record = json.loads(metadata(out)["apdm.subjects"])
    assert record["count"] == 4 and all(ok for _, ok in match_subjects(record, photos))
    assert not any(ok for _, ok in match_subjects(record, [draw_photo(0)]))


# (d) ------------------------------------------------------------------------------------------
def test_a_protected_folder_holds_no_local_paths_and_keeps_its_record(
    fast_config, sd1, subject_dir, tmp_path
):
    ckpt, cfg = sd1
    folder = tmp_path / "protected"
    config = fast_config(model=str(ckpt), model_type=str(cfg), output=str(folder),
                         instance_prompt="a photo of Jane Doe", **TINY)  # fmt: skip
    protect(config)
    texts = {
        name: (folder / name).read_text(encoding="utf-8")
        for name in ("apdm_config.json", "apdm_subjects.json")
    }
    for name, text in texts.items():
        for private in (str(tmp_path), "Jane", "img_0"):
            assert private not in text, (name, private)
    settings, record = (json.loads(t) for t in texts.values())
    assert settings["outer_steps"] == 1 and settings["instance_prompt"].startswith("salted-sha256:")
    assert settings["model_type"] == "sd1-cfg"  # a config folder: its name only
    assert record["count"] == 4 and all(ok for _, ok in match_subjects(record, subject_dir))

    # the folder -> a single file: the same settings and subject record, not a record of nothing
    single = tmp_path / "single.safetensors"
    argv = ["export", "--model", str(folder), "--template", str(ckpt), "--out", str(single)]
    assert main(argv) == 0
    meta = metadata(single)
    assert meta["apdm.protected"] == "true"
    assert json.loads(meta["apdm.subjects"]) == record and json.loads(meta["apdm.config"]) == settings


# (e) ------------------------------------------------------------------------------------------
def test_attack_evaluate_and_compare_take_model_type(sd1, subject_dir, tmp_path, capsys):
    ckpt, cfg = sd1
    images = ["--images", str(subject_dir)]
    wrong = ["--model-type", "sd2"]
    assert main(["evaluate", "--model", str(ckpt), *images, *wrong]) == 2
    assert main(["compare", "--base", str(ckpt), "--protected", str(ckpt), *images, *wrong,
                 "--out", str(tmp_path / "report")]) == 2  # fmt: skip
    assert capsys.readouterr().err.count("'sd2' was requested") == 2
    out = tmp_path / "attacked"
    argv = ["attack", "--model", str(ckpt), "--model-type", str(cfg), *images, "--kind", "lora", "--steps", "1",
            "--num-class-images", "1", "--sample-steps", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert (out / "pytorch_lora_weights.safetensors").exists()
