"""The demo world: generator, shipped model and evaluator, CLI, pretraining recipe (all fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from apdm_core.cli import main
from apdm_core.errors import InputError
from apdm_core.world import render
from apdm_core.world.pretrain import PretrainConfig, build_world_model

# ------------------------------------------------------------------------------------------
# the generator
# ------------------------------------------------------------------------------------------


def test_subjects_and_photos_are_deterministic():
    a, b = render.make_subject(7), render.make_subject(7)
    assert a == b
    pa, pb = render.photos(a, 3), render.photos(b, 3)
    assert [p.tobytes() for p in pa] == [p.tobytes() for p in pb]
    # photo i does not depend on how many are drawn, and photos of one subject differ (poses)
    assert render.photos(a, 1, start=2)[0].tobytes() == pa[2].tobytes()
    assert pa[0].tobytes() != pa[1].tobytes()
    assert pa[0].size == (render.SIZE, render.SIZE) and pa[0].mode == "RGB"


def test_seeds_and_namespaces_give_other_individuals():
    subjects = [render.make_subject(s) for s in range(40)]
    identities = {(s.cls, s.color, s.pattern, s.pattern_color, s.outline, s.tint) for s in subjects}
    assert len(identities) == 40
    assert {s.cls for s in subjects} == set(render.CLASSES)
    assert render.make_subject(3).tint != render.make_subject(3, "pretrain").tint
    assert render.make_subject(3, cls="kite").cls == "kite"
    with pytest.raises(ValueError):
        render.make_subject(3, cls="person")


def test_identity_is_consistent_across_photos():
    """The identity colours are in every photo of the subject, whatever the pose and lighting."""
    s = render.make_subject(11)
    body = np.array(render.COLORS[s.color]) + np.array(s.tint)
    for im in render.photos(s, 4):
        px = np.asarray(im).reshape(-1, 3).astype(float)
        nearest = np.abs(px - np.clip(body, 0, 255)).sum(1).min()
        assert nearest < 90  # the body colour (under +-15% lighting) is present


def test_prompts_follow_dreambooth_convention():
    s = render.make_subject(2)
    assert render.class_prompt(s.cls) == f"a photo of {s.cls}"
    assert render.instance_prompt(s.cls) == f"a photo of sks {s.cls}"
    rng = np.random.default_rng(0)
    captions = [render.caption(s, rng) for _ in range(200)]
    assert all(s.cls in c and "sks" not in c and s.outline not in c for c in captions)
    assert render.class_prompt(s.cls) in captions and any(s.pattern in c for c in captions)


# ------------------------------------------------------------------------------------------
# the shipped evaluator and model
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluator():
    from apdm_core.world import load_evaluator

    return load_evaluator()


@pytest.fixture(scope="module")
def world_model():
    from apdm_core.world import load_world_model

    return load_world_model()


def test_evaluator_separates_new_subjects(evaluator):
    subjects = [render.make_subject(s) for s in (1001, 1002, 1003, 1004)]
    refs = [render.photos(s, 3) for s in subjects]
    queries = [render.photos(s, 3, start=10) for s in subjects]
    sim = np.array([[evaluator.subject_similarity(q, r) for r in refs] for q in queries])
    assert (sim.argmax(1) == np.arange(4)).all(), sim
    assert sim.diagonal().min() > 0.7
    for s, q in zip(subjects, queries):
        assert evaluator.class_recognition(q, s.cls)["accuracy"] == 1.0
        assert evaluator.identity_match(q, s) >= 0.75
    assert evaluator.metadata["accuracy"]["cls"] > 0.95  # the stored held-out report


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_world_model_loads_like_sd_and_generates_its_classes(arch, world_model, evaluator):
    """Both shipped world models (SD1-shaped; SDXL-shaped: assets/model_xl) load through load_model and
    draw their classes."""
    from apdm_core.pairs import sample_images
    from apdm_core.world import load_world_model

    world_model = world_model if arch == "sd" else load_world_model(arch="sdxl")
    assert world_model.is_xl == (arch == "sdxl")
    assert world_model.kind == "tiny" and world_model.native_resolution == render.SIZE
    sizes = [p.stat().st_size for p in world_model_files(world_model.source)]
    assert sum(sizes) < 10e6
    accuracy = {}
    for cls in render.CLASSES:
        images = sample_images(world_model, render.class_prompt(cls), list(range(8)), render.SIZE, 12, 4.0, 8)
        accuracy[cls] = evaluator.class_recognition(images, cls)["accuracy"]
    # measured 0.75 / 0.625 / 1.0 / 1.0 (ball / box / star / kite; sdxl: 0.875 / 0.875 / 1.0 / 1.0); margins
    # for other CPUs' rounding
    assert min(accuracy.values()) >= 0.5 and np.mean(list(accuracy.values())) >= 0.7, accuracy


def world_model_files(folder):
    from pathlib import Path

    return [p for p in Path(folder).rglob("*.safetensors")]


# ------------------------------------------------------------------------------------------
# command line and recipes
# ------------------------------------------------------------------------------------------
def test_world_subject_command(tmp_path, capsys):
    out = tmp_path / "subject"
    assert main(["world", "subject", "--seed", "5", "--count", "2", "--out", str(out)]) == 0
    info = json.loads((out / "subject.json").read_text())
    s = render.make_subject(5)
    assert info["instance_prompt"] == f"a photo of sks {s.cls}" and info["color"] == s.color
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["subject5_00.png", "subject5_01.png"]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(files[1])), np.asarray(render.photos(s, 2)[1]))
    assert "a photo of sks" in capsys.readouterr().out
    assert main(["world", "subject", "--seed", "5", "--count", "2", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_pretrain_recipe_writes_a_loadable_model(tmp_path, capsys):
    from apdm_core.loading import load_model

    out = tmp_path / "world"
    argv = ["world", "pretrain", "--out", str(out), "--subjects", "4", "--photos", "1", "--vae-steps", "2",
            "--vae-batch", "2", "--unet-steps", "2", "--unet-batch", "2"]  # fmt: skip
    assert main(argv) == 0
    model = load_model(out)
    assert model.native_resolution == render.SIZE and len(model.tokenizer("sks").input_ids) == 3
    record = json.loads((out / "apdm_world.json").read_text())
    assert record["config"]["unet_steps"] == 2 and set(record["timing"]) >= {"vae", "unet"}
    card = (out / "MODEL_CARD.md").read_text()
    assert "apdm world pretrain --out MODEL_DIR" in card and "--unet-steps 2" in card
    assert main(argv) == 2  # never over an existing output


def test_pretrain_recipe_sdxl_world(tmp_path):
    """--arch sdxl: an SDXL-shaped world (two text encoders trained, pooled + size ids) that loads as SDXL,
    with the SD world's VAE reused and its DDIM sampler; it samples and the card names the layout."""
    from apdm_core.loading import load_model
    from apdm_core.pairs import sample_images
    from apdm_core.world import WORLD_MODEL_DIR

    out = tmp_path / "world_xl"
    argv = ["world", "pretrain", "--out", str(out), "--arch", "sdxl", "--subjects", "4", "--photos", "1",
            "--unet-steps", "3", "--unet-batch", "2", "--vae-from", str(WORLD_MODEL_DIR)]  # fmt: skip
    assert main(argv) == 0
    model = load_model(out)
    assert model.is_xl and model.native_resolution == render.SIZE
    assert type(model.scheduler).__name__ == "DDIMScheduler"
    assert model.tokenizer.model_max_length == model.tokenizer_2.model_max_length == 16
    assert model.unet.config.addition_embed_type == "text_time"
    from safetensors.torch import load_file

    vae = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    shipped = load_file(WORLD_MODEL_DIR / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(vae[k], shipped[k]) for k in shipped)  # the reused VAE, bit for bit
    trained = load_file(out / "text_encoder_2" / "model.safetensors")
    fresh = build_world_model(0, "sdxl").text_encoder_2.state_dict()
    assert any(not torch.equal(trained[k], fresh[k]) for k in trained)  # the second encoder trained too
    images = sample_images(model, render.class_prompt("ball"), [0, 1], render.SIZE, 2, 4.0, 2)
    assert len(images) == 2 and images[0].size == (render.SIZE, render.SIZE)
    card = (out / "MODEL_CARD.md").read_text()
    assert "SDXL-shaped" in card and "--arch sdxl" in card
    with pytest.raises(InputError, match="arch"):
        PretrainConfig(arch="sd3")


def test_train_evaluator_smoke(tmp_path):
    from apdm_core.world.evaluator import load_evaluator, save_evaluator, train_evaluator

    ev, report = train_evaluator(subjects=8, photos=1, steps=2, batch=4, heldout_subjects=4)
    assert set(report["accuracy"]) == set(render.ATTRIBUTES) and "verification_auc" in report
    path = save_evaluator(ev, tmp_path / "ev.safetensors")
    again = load_evaluator(path)
    im = render.photos(render.make_subject(1), 2)
    assert np.allclose(again.embed(im).numpy(), ev.embed(im).numpy(), atol=1e-6)


def test_demo_protects_attacks_and_reports_on_the_world_model(tmp_path):
    from helpers import tree_hashes

    from apdm_core.demo import DEMO_SUBJECT, run_demo
    from apdm_core.world import WORLD_MODEL_DIR

    before = tree_hashes(WORLD_MODEL_DIR)
    events = []
    small = {"num_class_images": 2, "sample_steps": 2, "sample_batch_size": 4}
    result = run_demo(tmp_path / "demo", progress=events.append, outer_steps=2, inner_steps=1, protect_every=1,
                      attack_overrides={"steps": 2, **small}, **small)  # fmt: skip
    protection = result.protection
    assert not result.cancelled and (protection.output / "unet").is_dir()
    subject = render.make_subject(DEMO_SUBJECT)
    assert len(list((tmp_path / "demo" / "subject").glob(f"{subject.name}_*.png"))) == 4
    assert protection.config.instance_prompt == f"a photo of sks {subject.cls}"
    assert {"protect", "attack", "sample"} <= {e.stage for e in events}
    report = json.loads((result.report_dir / "report.json").read_text())
    assert {p.name for p in result.report_dir.iterdir()} >= {"grid.png", "losses.png", "summary.md"}
    world = next(r for r in report["metrics"] if r["metric"] == "world")
    assert world["unprotected"] is not None and world["protected"] is not None and not world["skipped"]
    assert "world" in (result.report_dir / "summary.md").read_text()
    assert tree_hashes(WORLD_MODEL_DIR) == before  # the shipped model is only read


def test_world_metric_scores_identity(tmp_path):
    from apdm_core.evaluate import EvalConfig
    from apdm_core.evaluate.metrics import MetricContext, compute_metrics

    subject, other = render.make_subject(1), render.make_subject(2)
    refs = render.photos(subject, 4, start=100)

    def score(samples):
        ctx = MetricContext(references=refs, samples=samples, prompts=[], text_prompts=[],
                            config=EvalConfig(metrics=["world"]), class_noun=subject.cls)  # fmt: skip
        return compute_metrics(ctx, ["world"])["world"]

    same, different = score(render.photos(subject, 4)), score(render.photos(other, 4))
    assert same.value > 0.8 > different.value + 0.2
    assert same.details["class_recognition"] == 1.0 and same.protected_if == "lower"
