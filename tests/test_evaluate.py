"""Metrics on known inputs, skipped metrics with their message, the compare report, the CLI."""

import importlib.util
import json
import sys

import pytest
import torch
from helpers import draw_photo, natural_texture, tree_hashes, white_noise
from PIL import Image

from apdm_core.attack import AttackConfig, run_attack
from apdm_core.evaluate import (
    EvalConfig,
    compare,
    evaluate,
    face,
    register_metric,
    registered_metrics,
    sample_prompts,
)
from apdm_core.evaluate import metrics as M
from apdm_core.evaluate.prompts import LIVE, OBJECT
from apdm_core.loading import load_model


@pytest.fixture(scope="session")
def tiny_dino_dir(tmp_path_factory):
    """A randomly initialised ViT with DINO ViT-S/16's input geometry (224 px, 16 px patches)."""
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("models") / "tiny_dino"
    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64)  # fmt: skip
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def context(samples, refs=None, **cfg):
    return M.MetricContext(references=refs or [], samples=samples, prompts=[""] * len(samples),
                           text_prompts=[""] * len(samples), config=EvalConfig(**cfg))  # fmt: skip


def test_paper_and_dreambooth_prompts():
    prompts = sample_prompts(30, "sks", "person")
    assert prompts.count("a photo of sks person") == 15 and prompts.count("a portrait of sks person") == 15
    assert sample_prompts(25, "sks", "dog") == [t.format(id="sks", cls="dog") for t in LIVE]
    assert sample_prompts(25, "sks", "backpack")[-1] == "a cube shaped sks backpack" and len(OBJECT) == 25
    assert sample_prompts(3, "sks", "dog", ["{id} {cls} on a boat"]) == ["sks dog on a boat"] * 3


def test_dino_identical_images_have_similarity_one(tiny_dino_dir):
    a, b = draw_photo(0, size=300), draw_photo(7, size=300)
    same = M.dino_similarity(context([a, a], [a], dino_model=str(tiny_dino_dir)))
    assert same["value"] == pytest.approx(1.0, abs=1e-5)
    other = M.dino_similarity(context([b], [a], dino_model=str(tiny_dino_dir)))
    assert other["value"] < 0.999
    x = M.dino_preprocess([Image.new("RGB", (400, 300), (255, 0, 0))])
    assert x.shape == (1, 3, 224, 224)  # short side 256, center crop 224
    torch.testing.assert_close(
        x[0, :, 0, 0],
        (torch.tensor([1.0, 0, 0]) - torch.tensor(M.IMAGENET_MEAN)) / torch.tensor(M.IMAGENET_STD),
    )


def test_missing_weights_give_a_skipped_metric_with_a_message(tmp_path, monkeypatch):
    ctx = context(
        [draw_photo(0)], [draw_photo(1)], dino_model="facebook/no-such-dino", clip_model=str(tmp_path)
    )
    results = M.compute_metrics(ctx, ["dino", "clip", "no_such_metric"])
    assert results["dino"].value is None and "huggingface-cli download" in results["dino"].skipped
    assert "--dino-model PATH" in results["dino"].skipped and "\n" not in results["dino"].skipped
    assert results["clip"].value is None and "--clip-model" in results["clip"].skipped
    assert "unknown metric" in results["no_such_metric"].skipped
    monkeypatch.setitem(sys.modules, "brisque", None)  # not installed
    monkeypatch.setitem(sys.modules, "dlib", None)
    monkeypatch.setitem(sys.modules, "pyiqa", None)
    for loader in (M.load_brisque, face.load_face_models):
        loader.cache_clear()
    results = M.compute_metrics(ctx, ["brisque", "face", "fdfr", "pyiqa", "denoise"])
    assert "pip install" in results["brisque"].skipped and "dlib" in results["face"].skipped
    assert "pyiqa" in results["pyiqa"].skipped and "attacked model" in results["denoise"].skipped
    assert all(r.value is None for r in results.values())
    for loader in (M.load_brisque, face.load_face_models):
        loader.cache_clear()


def test_brisque_is_skipped_when_neither_brisque_nor_opencv_is_installed(monkeypatch):
    """A host python without the [eval] extra (e.g. ComfyUI's) has no cv2 either: skip, never crash."""
    for name in ("brisque", "cv2"):
        monkeypatch.setitem(sys.modules, name, None)
    M.load_brisque.cache_clear()
    try:
        result = M.compute_metrics(context([draw_photo(0)], [draw_photo(1)]), ["brisque"])["brisque"]
    finally:
        M.load_brisque.cache_clear()
    assert result.value is None and "pip install" in result.skipped


def test_brisque_scores_noise_worse_than_a_photo_like_image():
    pytest.importorskip("brisque")
    pytest.importorskip("cv2")
    noise, photo = M.brisque_image_score(white_noise(128)), M.brisque_image_score(natural_texture(128))
    assert noise > photo + 30
    result = M.brisque_score(context([white_noise(128, 1), natural_texture(128, 1)]))
    assert result["value"] == pytest.approx(sum(result["per_sample"]) / 2)


def test_face_metrics_on_images_without_faces():
    pytest.importorskip("dlib")
    if importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("face_recognition_models is not installed")
    ctx = context([Image.new("RGB", (128, 128), (90, 90, 90))] * 2, [draw_photo(0, size=128)])
    results = M.compute_metrics(ctx, ["face", "fdfr"])
    assert results["fdfr"].value == 1.0
    assert results["face"].value is None and "no face detected" in results["face"].skipped
    ctx.class_noun = "dog"
    assert "person subjects" in M.compute_metrics(ctx, ["fdfr"])["fdfr"].skipped


def test_registry_takes_new_metrics_and_never_reports_a_silent_zero():
    register_metric("test_mean_red", lambda ctx: sum(im.getpixel((0, 0))[0] for im in ctx.samples) / len(ctx.samples),
                    protected_if="lower")  # fmt: skip
    register_metric("test_nan", lambda ctx: float("nan"), protected_if="higher")
    try:
        results = M.compute_metrics(
            context([Image.new("RGB", (8, 8), (200, 0, 0))]), ["test_mean_red", "test_nan"]
        )
        assert results["test_mean_red"].value == 200.0
        assert results["test_nan"].value is None and results["test_nan"].skipped
    finally:
        for name in ("test_mean_red", "test_nan"):
            M._METRICS.pop(name)
    assert {"denoise", "dino", "brisque", "face", "fdfr", "clip", "pyiqa"} <= set(registered_metrics())


def test_denoising_score_drops_when_the_model_learns_the_subject(tiny_model_dir, subject_dir, tmp_path):
    model = load_model(tiny_model_dir)
    refs = [draw_photo(i) for i in range(4)]
    cfg = EvalConfig(metrics=["denoise"], denoise_timesteps=[200, 600], denoise_repeats=2)
    before = M.compute_metrics(M.MetricContext(refs, [], [], [], cfg, model=model), ["denoise"])["denoise"]
    again = M.compute_metrics(M.MetricContext(refs, [], [], [], cfg, model=model), ["denoise"])["denoise"]
    assert before.value == again.value and set(before.details["per_timestep"]) == {200, 600}  # fixed noise
    attack = AttackConfig(kind="dreambooth", steps=15, lr=2e-3, prior_weight=0.0, device="cpu",
                          cache_dir=str(tmp_path / "c"), save_every=0)  # fmt: skip
    attacked = run_attack(model, subject_dir, attack).model
    after = M.compute_metrics(M.MetricContext(refs, [], [], [], cfg, model=attacked), ["denoise"])["denoise"]
    assert after.value < 0.9 * before.value


def test_evaluate_samples_with_the_attacked_models_words(tiny_model_dir, subject_dir, tmp_path):
    model = load_model(tiny_model_dir)
    attack = AttackConfig(kind="textual_inversion", steps=1, device="cpu", cache_dir=str(tmp_path / "c"))
    result = run_attack(model, subject_dir, attack)
    ev = evaluate(result.model, subject_dir, EvalConfig(num_samples=2, eval_steps=2, metrics=["denoise"]),
                  prompt_map=result.prompt_map)  # fmt: skip
    assert len(ev.samples) == 2 and ev.samples[0].size == (64, 64) and ev.seeds == [0, 1]
    assert ev.prompts == ["a photo of sks person", "a portrait of sks person"]
    assert ev.metrics["denoise"].value > 0


def fast_compare_configs(tmp_path, tiny_dino_dir, **attack):
    a = AttackConfig(**{"kind": "lora", "steps": 3, "lr": 1e-3, "num_class_images": 2, "sample_steps": 2,
                        "device": "cpu", "cache_dir": str(tmp_path / "cache"), "save_every": 0, **attack})  # fmt: skip
    e = EvalConfig(num_samples=3, eval_steps=2, metrics=["denoise", "dino", "brisque"], dino_model=str(tiny_dino_dir),
                   denoise_timesteps=[500], denoise_repeats=1)  # fmt: skip
    return a, e


def test_compare_writes_a_readable_report(tiny_model_dir, subject_dir, tmp_path, tiny_dino_dir):
    base, protected = load_model(tiny_model_dir), load_model(tiny_model_dir)
    with torch.no_grad():
        for p in protected.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = tree_hashes(tiny_model_dir, subject_dir)
    history = [{"step": i, "loss_protect": 1.0 / i, "loss_per": 0.5} for i in range(1, 6)]
    attack, ev = fast_compare_configs(tmp_path, tiny_dino_dir)
    out = tmp_path / "report"
    result = compare(base, protected, subject_dir, attack, ev, out_dir=out, protection_history=history)
    assert result.out_dir == out and not result.cancelled
    assert tree_hashes(tiny_model_dir, subject_dir) == before
    report = json.loads((out / "report.json").read_text())
    assert report["attack_config"]["kind"] == "lora" and report["attack_config"]["lr"] == 1e-3
    assert report["eval_config"]["num_samples"] == 3 and report["protection_history"] == history
    rows = {r["metric"]: r for r in report["metrics"]}
    for name in ("denoise", "dino"):
        assert isinstance(rows[name]["unprotected"], float) and isinstance(rows[name]["protected"], float)
        assert rows[name]["change"] == pytest.approx(rows[name]["protected"] - rows[name]["unprotected"])
    assert len(report["arms"]["protected"]["history"]) == 3
    with Image.open(out / "grid.png") as grid:
        assert grid.size[0] > 300 and grid.size[1] > 3 * 150  # three labelled rows
    with Image.open(out / "losses.png") as plot:
        assert plot.size[0] > 1000  # two panels: protection + attack
    summary = (out / "summary.md").read_text()
    assert "| denoise |" in summary and "| dino |" in summary and "lora attack" in summary
    assert len(list((out / "samples" / "protected").glob("*.png"))) == 3
    assert not (tmp_path / "report.apdm-compare").exists()
    assert result.value("dino", "unprotected") == rows["dino"]["unprotected"]
    # where the attack started (the unprotected model without it) and the efficiency against it
    u, p, b = rows["denoise"]["unprotected"], rows["denoise"]["protected"], rows["denoise"]["unattacked"]
    assert isinstance(b, float) and rows["denoise"]["efficiency"] == pytest.approx((u - p) / (u - b))
    # what the protection cost before any attack: the utility prompts on both models, same seeds
    (cls_row, unrelated) = report["utility"]
    assert cls_row["prompt"] == "a photo of person" and unrelated["prompt"] == "a photo of a house"
    assert 0 < cls_row["similarity"] < 1 and cls_row["quality"] is None  # no judge for these prompts
    assert "What the protection cost (no attack)" in summary and "| a photo of a house |" in summary
    with Image.open(out / "grid.png") as grid:
        assert grid.size[1] > 8 * 150  # reference, unattacked, 2 attacked, 2 x 2 utility rows
    same = compare(
        base, base, subject_dir, attack, ev.replace(metrics=["denoise"], utility_prompts=["a photo of {cls}"])
    )
    assert same.report["utility"][0]["similarity"] == pytest.approx(1.0)


def test_compare_stops_and_resumes_without_redoing_a_finished_arm(tiny_model_dir, subject_dir, tmp_path,
                                                                  tiny_dino_dir, monkeypatch):  # fmt: skip
    base, protected = load_model(tiny_model_dir), load_model(tiny_model_dir)
    attack, ev = fast_compare_configs(tmp_path, tiny_dino_dir, steps=4)
    ev = ev.replace(metrics=["denoise"])
    events = []
    attacks = lambda: sum(e.stage == "attack" for e in events)  # noqa: E731
    out = tmp_path / "report"
    stopped = compare(base, protected, subject_dir, attack, ev, out_dir=out, progress=events.append,
                      should_stop=lambda: attacks() >= 6)  # the protected arm's 2nd step  # fmt: skip
    assert stopped.cancelled and not out.exists() and (stopped.work_dir / "unprotected" / "arm.json").exists()
    import apdm_core.evaluate.report as report_module

    runs = []
    real = report_module.run_attack
    monkeypatch.setattr(
        report_module, "run_attack", lambda *a, **k: runs.append(k.get("resume")) or real(*a, **k)
    )
    events.clear()
    resumed = compare(
        base, protected, subject_dir, attack, ev, out_dir=out, resume=True, progress=events.append
    )
    assert not resumed.cancelled and runs == [True]  # only the protected arm, resumed from its state
    assert [e.step for e in events if e.stage == "attack"] == [3, 4]
    full = compare(base, protected, subject_dir, attack, ev, out_dir=tmp_path / "full")
    for arm in ("unprotected", "protected"):
        assert [h["loss"] for h in resumed.arms[arm].history] == [h["loss"] for h in full.arms[arm].history]
        assert resumed.value("denoise", arm) == full.value("denoise", arm)


def test_cli_attack_evaluate_compare(tiny_model_dir, subject_dir, tmp_path, tiny_dino_dir, capsys):
    from apdm_core.cli import main

    common = ["--steps", "2", "--num-class-images", "2", "--sample-steps", "2", "--device", "cpu",
              "--cache-dir", str(tmp_path / "cache"), "--lr", "1e-3"]  # fmt: skip
    out = tmp_path / "lora"
    argv = ["attack", "--model", str(tiny_model_dir), "--images", str(subject_dir), "--kind", "lora",
            "--out", str(out), "--no-random-crop", "--save-config", str(tmp_path / "a.yaml"), *common]  # fmt: skip
    assert main(argv) == 0
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert AttackConfig.load(tmp_path / "a.yaml").random_crop is False
    assert "lora attack written to" in capsys.readouterr().out
    eval_flags = ["--num-samples", "2", "--eval-steps", "2", "--metrics", "denoise", "dino",
                  "--dino-model", str(tiny_dino_dir), "--denoise-timesteps", "500"]  # fmt: skip
    argv = ["evaluate", "--model", str(tiny_model_dir), "--attack-output", str(out), "--images", str(subject_dir),
            "--out", str(tmp_path / "ev"), *eval_flags]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert data["metrics"]["dino"]["value"] is not None and len(data["prompts"]) == 2
    argv = ["compare", "--base", str(tiny_model_dir), "--protected", str(tiny_model_dir), "--images",
            str(subject_dir), "--out", str(tmp_path / "cmp"), "--kind", "textual_inversion", *common, *eval_flags]  # fmt: skip
    assert main(argv) == 0
    assert "| denoise |" in capsys.readouterr().out
    assert (
        json.loads((tmp_path / "cmp" / "report.json").read_text())["attack_config"]["kind"]
        == "textual_inversion"
    )
    assert (
        main(["compare", "--base", str(tiny_model_dir), "--protected", "nope", "--images", "x", "--out", "y"])
        == 2
    )
    assert "nope does not exist" in capsys.readouterr().err


def test_readme_commands_of_this_section_parse():
    import re
    import shlex
    from pathlib import Path

    from apdm_core.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Test personalization") :]
    section = section[: section.index("\n## ", 5)]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = [
        c for b in blocks for c in b.replace("\\\n", " ").splitlines() if "apdm " in c and "..." not in c
    ]
    assert len(commands) >= 5
    parser = build_parser()
    for command in commands:
        words = shlex.split(command.split("#")[0])
        words = words[words.index("apdm") + 1 :]
        if words[0] in ("attack", "evaluate", "compare"):
            parser.parse_args(words)  # exits on an unknown flag
