"""ComfyUI nodes against a fake ComfyUI (tests/fakes/comfyui): schemas, the whole graph on the tiny model,
interrupt + resume, file names, the MODEL patches."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import torch
from comfy_host import ROOT, ComfyHost, call_signature_matches
from helpers import draw_photo

from apdm_core.errors import InputError

FAST_PAIRS = {"class_prompt": "a photo of dog", "seed": 0, "resolution": 0, "num_class_images": 2,
              "sample_steps": 2, "guidance_scale": 2.0}  # fmt: skip
FAST_PROTECT = {"instance_prompt": "a photo of sks dog", "steps": 3, "inner_steps": 2, "beta": 1.0,
                "learning_rate": 1e-4, "accumulation": "protect"}  # fmt: skip


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """One fake ComfyUI for the module (its runs are the slow part): base folder + APDM cache in tmp."""
    tmp = tmp_path_factory.mktemp("comfyui")
    old = os.environ.get("APDM_CACHE_DIR")
    os.environ["APDM_CACHE_DIR"] = str(tmp / "apdm_cache")
    h = ComfyHost(tmp / "base")
    yield h
    h.close()
    if old is None:
        os.environ.pop("APDM_CACHE_DIR")
    else:
        os.environ["APDM_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def graph(host, tiny_model_dir):
    """The example graph on the tiny model: photos in input/alice, the model in models/diffusers/tiny."""
    shutil.copytree(tiny_model_dir, host.folder_paths.get_folder_paths("diffusers")[0] + "/tiny")
    photos = host.folder_paths.get_input_directory() + "/alice"
    os.makedirs(photos)
    for i in range(4):
        draw_photo(i).save(f"{photos}/img_{i}.png")
    subject, preview = host.run("APDMLoadSubjectImages", folder="alice")
    (model,) = host.run("APDMLoadModel", ckpt_name="[diffusers] tiny")
    pairs, positives = host.run("APDMGeneratePairs", model=model, subject=subject, **FAST_PAIRS)
    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    host.server.messages.clear()
    protected, curve = host.run("APDMProtectModel", unique_id="7", model=model, subject=subject, pairs=pairs,
                                **FAST_PROTECT)  # fmt: skip
    return {"subject": subject, "preview": preview, "model": model, "pairs": pairs, "positives": positives,
            "base": base, "protected": protected, "curve": curve, "messages": list(host.server.messages)}  # fmt: skip


# --- schemas ----------------------------------------------------------------------------------
def test_every_node_schema_is_valid(host):
    assert host.nodes and set(host.nodes) == set(host.package.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in host.nodes.items():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"} and spec["required"], node_id
        assert cls.CATEGORY == "APDM" and callable(getattr(cls, cls.FUNCTION)), node_id
        assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES), node_id
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES), node_id
        assert not call_signature_matches(cls), (node_id, call_signature_matches(cls))
        for section in ("required", "optional"):
            for name, (kind, *rest) in spec.get(section, {}).items():
                opts = rest[0] if rest else {}
                if isinstance(kind, list):
                    assert kind and all(isinstance(c, str) for c in kind), (node_id, name)
                    assert opts.get("default", kind[0]) in kind, (node_id, name)
                else:
                    assert isinstance(kind, str) and kind.isupper(), (node_id, name)
                if kind in ("INT", "FLOAT"):
                    assert opts["min"] <= opts["default"] <= opts["max"], (node_id, name)


def test_package_loads_like_comfyui_with_its_web_extension(host):
    web = ROOT / host.package.WEB_DIRECTORY
    assert sorted(p.name for p in (web / "js").glob("*.js")) == ["apdm.js"]
    assert "apdm.progress" in (web / "js" / "apdm.js").read_text(encoding="utf-8")
    assert set(host.nodes) >= {"APDMLoadSubjectImages", "APDMLoadModel", "APDMGeneratePairs", "APDMProtectModel",
                               "APDMToComfyModel", "APDMSampleImages"}  # fmt: skip


def test_package_leaves_sys_path_as_it_found_it(tmp_path):
    """Loaded from another folder, as ComfyUI does: the nodes register, sys.path is unchanged (so this
    folder's `nodes`, `scripts`, `tests` never shadow ComfyUI's modules) and the engine is the one next
    to the package."""
    import subprocess
    import sys

    code = (
        "import importlib.util, sys\n"
        f"root = {str(ROOT)!r}\n"
        "sys.path[:] = [p for p in sys.path if p not in ('', root)]\n"
        "before = list(sys.path)\n"
        "spec = importlib.util.spec_from_file_location('custom_nodes_APDM', root + '/__init__.py')\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert sys.path == before, (sys.path, before)\n"
        "assert 'APDMProtectModel' in module.NODE_CLASS_MAPPINGS\n"
        "import apdm_core\n"
        "assert apdm_core.__file__.startswith(root), apdm_core.__file__\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr


# --- the graph on the tiny model ---------------------------------------------------------------
def test_whole_graph_runs_and_reports_progress(host, graph):
    assert graph["subject"] == [host.folder_paths.get_input_directory() + "/alice"]
    assert graph["preview"].shape == (4, 256, 256, 3) and graph["positives"].shape == (4, 64, 64, 3)
    assert len(graph["pairs"].class_images) == 2
    protected, curve, base = graph["protected"], graph["curve"], graph["base"]
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and 0 <= float(curve.min()) <= float(curve.max()) <= 1
    after = graph["model"].unet.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base), "the base model object was modified"
    assert any(not torch.equal(base[k], v) for k, v in protected.unet.state_dict().items())
    assert protected.info["protect_config"].outer_steps == 3
    assert "unload_all_models" in host.mm.calls
    # live events for web/js: every inner step's loss arrives, tagged with the node id
    events = [d for ev, d, _ in graph["messages"] if ev == "apdm.progress" and d["stage"] == "protect"]
    assert {m["node"] for m in events} == {"7"} and events[-1]["step"] == events[-1]["total"] == 6
    assert [p[0] for m in events for p in m["points"]] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(p[1], float) and isinstance(p[2], float) for m in events for p in m["points"])
    assert "ETA" in events[-2]["text"] or len(events) == 1
    assert {d["node"] for ev, d, _ in graph["messages"] if ev == "progress"} == {"7"}  # ComfyUI's own bar
    assert {sid for ev, _, sid in graph["messages"] if ev == "apdm.progress"} == {
        "test-client"
    }  # the queuing client
    previews = [
        d for ev, d, _ in graph["messages"] if ev == "preview"
    ]  # the loss curve as the node's preview
    assert previews and previews[-1][0] == "PNG" and previews[-1][1].size[0] > 100
    (images,) = host.run("APDMSampleImages", model=graph["protected"], prompt="a photo of dog", negative_prompt="",
                         seed=3, count=2, steps=2, guidance_scale=2.0, resolution=0)  # fmt: skip
    assert images.shape == (2, 64, 64, 3)


def test_generate_pairs_reuses_the_cache_and_protect_refuses_pairs_of_another_model(host, graph):
    from apdm_core.tiny import build_tiny_model

    again, _ = host.run("APDMGeneratePairs", model=graph["model"], subject=graph["subject"], **FAST_PAIRS)
    assert [p.tobytes() for p in again.positives] == [p.tobytes() for p in graph["pairs"].positives]
    other = build_tiny_model(seed=1)
    with pytest.raises(InputError, match="another model"):
        host.run(
            "APDMProtectModel", model=other, subject=graph["subject"], pairs=graph["pairs"], **FAST_PROTECT
        )


def test_interrupt_stops_within_one_step_and_requeue_resumes(host, graph):
    run = {"model": graph["model"], "subject": graph["subject"], "pairs": graph["pairs"],
           **FAST_PROTECT, "steps": 2, "beta": 2.0}  # fmt: skip
    seen = []

    def cancel_at_step_3(value, total, node_id):  # the user presses Cancel during inner step 3 of 4
        seen.append(value)
        if total == 4 and value == 3:
            host.mm.interrupt_current_processing(True)

    host.on_progress = cancel_at_step_3
    try:
        with pytest.raises(host.mm.InterruptProcessingException):
            host.run("APDMProtectModel", **run)
        assert seen[-1] == 3  # no step after the interrupt
        states = list((Path(os.environ["APDM_CACHE_DIR"]) / "state").glob("*.pt"))
        assert len(states) == 1, "the interrupted run left no resumable state"
        host.on_progress, seen[:] = (lambda value, total, node_id: seen.append((value, total))), []
        host.run("APDMProtectModel", **run)
        protect_steps = [v for v, t in seen if t == 4]
        assert protect_steps == [3, 4]  # resumed at outer step 2: its inner steps 1 and 2
        assert not states[0].exists(), "the state file is removed after the run finished"
    finally:
        host.on_progress = None


def test_advanced_settings(host, graph):
    protect_config = host.package.nodes.host.protect_config
    config = protect_config(graph["pairs"], graph["model"], {"beta": 3.0}, "prior_weight: 0.5, save_every: 1")
    assert protect_config(graph["pairs"], graph["model"], {}, "prior_weight: 0.25\nbeta: 2").beta == 2
    assert (config.prior_weight, config.save_every, config.beta, config.class_prompt) == (
        0.5,
        1,
        3.0,
        "a photo of dog",
    )
    run = {"model": graph["model"], "subject": graph["subject"], "pairs": graph["pairs"], **FAST_PROTECT}
    for text, match in [("output: x.safetensors", "Save Protected Checkpoint"), ("[1, 2]", "field: value"),
                        ("beta: [", "not valid YAML"), ("just words", "Unknown config key"), ("betta: 2", "Unknown config key")]:  # fmt: skip
        with pytest.raises(InputError, match=match):
            host.run("APDMProtectModel", advanced=text, **run)


def test_protect_node_method_inputs(host, graph):
    """The method/backdoor/target_prompt widgets come after the old inputs (old workflows still load)
    and run PersGuard; the run records its method."""
    spec = host.nodes["APDMProtectModel"].INPUT_TYPES()
    assert list(spec["optional"]) == [
        "advanced",
        "method",
        "backdoor",
        "target_prompt",
        "more_subjects",
        "preset",
        "original_model",
    ]
    assert spec["optional"]["method"][0] == ["apdm", "persguard"]
    run = {"model": graph["model"], "subject": graph["subject"], "pairs": graph["pairs"], **FAST_PROTECT}
    protected, _ = host.run("APDMProtectModel", method="persguard", backdoor="target",
                            target_prompt="a photo of cat", **{**run, "steps": 1})  # fmt: skip
    config = protected.info["protect_config"]
    assert (config.method, config.backdoor, config.target_prompt) == ("persguard", "target", "a photo of cat")
    assert "behaviour" in protected.info["protect_history"][-1]
    with pytest.raises(InputError, match="target_prompt"):
        host.run("APDMProtectModel", method="persguard", backdoor="target", **{**run, "steps": 1})
    with pytest.raises(InputError, match="backdoor_images cannot be set"):
        host.run("APDMProtectModel", method="persguard", advanced="backdoor_images: /etc", **run)


@pytest.mark.parametrize(
    "text",
    ["state_path: /etc/cron.d/x", "cache_dir: /tmp/elsewhere", "class_images: ../../secrets",
     "model_type: /some/config/folder", "{dino_model: /x}"],
)  # fmt: skip
def test_a_workflow_cannot_name_a_path(host, graph, text):
    """A shared workflow's advanced box (or a posted prompt) must not read or write files."""
    with pytest.raises(InputError, match="cannot be set in the advanced settings|must be one of"):
        host.package.nodes.host.parse_settings(text)
    widgets = {
        "kind": "dreambooth",
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of dog",
    }
    if "model_type" not in text:
        with pytest.raises(InputError, match="cannot be set"):
            host.package.nodes.host.test_configs(widgets, text)


# --- inputs -----------------------------------------------------------------------------------
def test_subject_from_an_image_batch_and_is_changed(host):
    folder = host.folder_paths.get_input_directory() + "/bob"
    os.makedirs(folder)
    draw_photo(0).save(folder + "/a.png")
    cls = host.nodes["APDMLoadSubjectImages"]
    before = cls.IS_CHANGED(folder="bob")
    assert cls.IS_CHANGED(folder="bob") == before
    draw_photo(1).save(folder + "/b.png")
    assert cls.IS_CHANGED(folder="bob") != before
    batch = torch.rand(3, 80, 96, 3)
    subject, preview = host.run("APDMLoadSubjectImages", folder="bob", images=batch)
    assert len(subject) == 3 and subject[0].size == (96, 80) and preview.shape == (3, 256, 256, 3)
    subject, _ = host.run("APDMLoadSubjectImages", folder=host.package.nodes.host.DEMO_SUBJECT)
    assert len(subject) == 4


@pytest.mark.parametrize("name", ["../secret", "a/../../b", "/etc", "C:/x", ".hidden", "a\\..\\..\\b", ""])
def test_subject_folder_cannot_leave_the_input_folder(host, name):
    with pytest.raises(InputError, match="not a valid file name"):
        host.package.nodes.host.subject_folder(name)


def test_missing_model_names_the_folders(host):
    with pytest.raises(InputError, match="models/checkpoints"):
        host.package.nodes.host.model_path("nope.safetensors")


def test_demo_model_entry(host):
    (model,) = host.run("APDMLoadModel", ckpt_name=host.package.nodes.host.DEMO_MODEL)
    assert model.kind == "tiny" and not any(p.is_inference() for p in model.unet.parameters())


# --- MODEL patches ------------------------------------------------------------------------------
def comfy_model_of(unet):
    from comfy.model_patcher import FakeBaseModel, ModelPatcher

    return ModelPatcher(FakeBaseModel(copy.deepcopy(unet)))


def test_protection_becomes_weight_patches_on_a_clone(host, graph):
    protected = graph["protected"]
    comfy_model = comfy_model_of(graph["model"].unet)
    original = {k: v.clone() for k, v in comfy_model.model.state_dict().items()}
    want = {"diffusion_model." + k: v for k, v in protected.unet.state_dict().items()}
    clip, vae = object(), object()
    full, clip_out, vae_out = host.run("APDMToComfyModel", protected_model=protected, strength=1.0, model=comfy_model,
                                       clip=clip, vae=vae)  # fmt: skip
    assert clip_out is clip and vae_out is vae and full is not comfy_model
    got = full.patched_state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    half = host.run("APDMToComfyModel", protected_model=protected, strength=0.5, model=comfy_model)[0]
    mid = half.patched_state_dict()
    assert all(torch.allclose(mid[k], (want[k] + original[k]) / 2, atol=1e-6) for k in want)
    none = host.run("APDMToComfyModel", protected_model=protected, strength=0.0, model=comfy_model)[0]
    assert none.patches == {} and not comfy_model.patches
    assert all(torch.equal(original[k], v) for k, v in comfy_model.model.state_dict().items()), (
        "MODEL modified"
    )


def test_model_conversion_needs_the_matching_model(host, graph, tiny_vpred_dir):
    with pytest.raises(InputError, match="Connect the MODEL"):
        host.run("APDMToComfyModel", protected_model=graph["model"], strength=1.0)
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                 norm_num_groups=8, sample_size=8, layers_per_block=1)  # fmt: skip
    with pytest.raises(InputError, match="not the same kind"):
        host.run(
            "APDMToComfyModel", protected_model=graph["model"], strength=1.0, model=comfy_model_of(other)
        )


# --- Test Personalization -------------------------------------------------------------------------
FAST_TEST = {"attack": "dreambooth", "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog",
             "steps": 2, "learning_rate": 1e-4, "num_samples": 2, "seed": 0,
             "advanced": "num_class_images: 2, sample_steps: 2, guidance_scale: 2.0, metrics: [denoise], "
                         "eval_steps: 2, eval_batch_size: 2, denoise_repeats: 1, denoise_timesteps: [500]"}  # fmt: skip


def test_test_personalization_writes_a_report_and_reuses_it(host, graph):
    run = {"base_model": graph["model"], "protected_model": graph["protected"], "subject": graph["subject"]}
    grid, metrics = host.run("APDMTestPersonalization", unique_id="9", **run, **FAST_TEST)
    reports = list(Path(host.folder_paths.get_output_directory(), "apdm_reports").iterdir())
    assert [p.name.split("-")[0] for p in reports] == ["dreambooth"]
    assert {"report.json", "grid.png", "losses.png", "summary.md"} <= {p.name for p in reports[0].iterdir()}
    assert grid.shape[0] == 1 and grid.shape[-1] == 3 and "denoise" in metrics and str(reports[0]) in metrics
    assert any(m["stage"] == "attack" for m in host.messages("apdm.progress"))
    stamp = (reports[0] / "report.json").stat().st_mtime_ns
    again = host.run("APDMTestPersonalization", **run, **FAST_TEST)  # same test: the report is shown again
    assert again[1] == metrics and (reports[0] / "report.json").stat().st_mtime_ns == stamp


def test_test_settings(host):
    test_configs = host.package.nodes.host.test_configs
    widgets = {"kind": "lora", "instance_prompt": "a photo of zwx cat", "class_prompt": "a photo of cat",
               "steps": None, "lr": None, "seed": 3, "num_samples": 5, "eval_seed": 3}  # fmt: skip
    attack, evaluation = test_configs(widgets, "lora_rank: 8, eval_steps: 7")
    assert (attack.identifier, attack.kind, attack.lora_rank, attack.resolved().steps) == (
        "zwx",
        "lora",
        8,
        800,
    )
    assert (evaluation.num_samples, evaluation.eval_steps, evaluation.eval_seed) == (5, 7, 3)
    with pytest.raises(InputError, match="Unknown setting"):
        test_configs(widgets, "rank: 8")
    with pytest.raises(InputError, match="Load Subject Images"):
        test_configs(widgets, "images: x/")


# --- Save Protected Checkpoint ------------------------------------------------------------------
def test_save_single_file_into_checkpoints(host, tmp_path, subject_dir):
    import dataclasses
    import json

    from ldm_layout import make_checkpoint, write_config_folder
    from safetensors import safe_open

    from apdm_core.config import ProtectConfig
    from apdm_core.loading import load_model

    ckpt_dir = Path(host.folder_paths.get_folder_paths("checkpoints")[0])
    source = make_checkpoint(ckpt_dir / "tiny-sd1.safetensors", "sd1")
    assert "tiny-sd1.safetensors" in host.nodes["APDMLoadModel"].INPUT_TYPES()["required"]["ckpt_name"][0]
    cfg = write_config_folder(
        tmp_path / "sd1-cfg", "sd1"
    )  # the tiny file's configs (real files use shipped ones)
    base = load_model(source, model_type=str(cfg))
    unet = copy.deepcopy(base.unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    info = {
        "protect_config": ProtectConfig(instance_prompt="a photo of sks dog"),
        "protect_subject": [str(subject_dir)],
    }
    protected = dataclasses.replace(base, unet=unet, info={**base.info, **info}, _fingerprint=None)
    for bad in ("../escape", "/abs/path", "a/../../b"):
        with pytest.raises(InputError, match="not a valid file name"):
            host.run("APDMSaveProtectedCheckpoint", protected_model=protected, filename=bad, overwrite=False)
    (path,) = host.run(
        "APDMSaveProtectedCheckpoint", protected_model=protected, filename="apdm/prot", overwrite=False
    )
    assert host.ui["APDMSaveProtectedCheckpoint"] == {"text": [path]}
    assert Path(path) == ckpt_dir / "apdm" / "prot.safetensors"
    assert "apdm/prot.safetensors" in host.folder_paths.get_filename_list(
        "checkpoints"
    )  # Load Checkpoint sees it
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["apdm.protected"] == "true" and json.loads(meta["apdm.subjects"])["count"] == 4
    again = load_model(path, model_type=str(cfg)).unet.state_dict()
    assert all(torch.equal(again[k], v) for k, v in unet.state_dict().items())
    stamp = Path(path).stat().st_mtime_ns
    with pytest.raises(InputError, match="already exists"):
        host.run(
            "APDMSaveProtectedCheckpoint", protected_model=protected, filename="apdm/prot", overwrite=False
        )
    assert Path(path).stat().st_mtime_ns == stamp
    host.run("APDMSaveProtectedCheckpoint", protected_model=protected, filename="apdm/prot", overwrite=True)
    with pytest.raises(InputError, match="is the input .* itself"):  # never over the source checkpoint
        host.run(
            "APDMSaveProtectedCheckpoint", protected_model=protected, filename="tiny-sd1", overwrite=True
        )


def test_protect_the_model_of_the_graph(host, tmp_path, monkeypatch, subject_dir):
    """MODEL/CLIP/VAE (as Load Checkpoint or a LoRA loader hands them on) -> the engine's model, through
    ComfyUI's model management; saved in ComfyUI's layout; applied to the same MODEL as patches."""
    import dataclasses
    import json

    import comfy.model_management as mm
    from comfy.model_patcher import FakeBaseModel, ModelPatcher
    from comfy.sd import CLIP, VAE
    from ldm_layout import make_checkpoint, write_config_folder
    from safetensors import safe_open
    from safetensors.torch import load_file

    import apdm_core.detection as detection
    from apdm_core.config import ProtectConfig
    from apdm_core.loading import load_model

    monkeypatch.setattr(detection, "CONFIG_ROOT", tmp_path / "configs")  # the tiny model's configs as "sd1"
    write_config_folder(tmp_path / "configs" / "sd1", "sd1")
    source = make_checkpoint(tmp_path / "graph.safetensors", "sd1", dtype=torch.float16, seed=3)
    state = load_file(source)
    unet_p, clip_p, vae_p = "model.diffusion_model.", "cond_stage_model.", "first_stage_model."
    ref = load_model(source, model_type="sd1")
    ldm_unet = {k[len(unet_p) :]: v for k, v in state.items() if k.startswith(unet_p)}
    comfy_model = ModelPatcher(FakeBaseModel(copy.deepcopy(ref.unet), ldm_unet=ldm_unet))
    clip = CLIP({"clip_l." + k[len(clip_p) :]: v for k, v in state.items() if k.startswith(clip_p)})
    vae = VAE({k[len(vae_p) :]: v for k, v in state.items() if k.startswith(vae_p)})
    mm.calls.clear()
    (model,) = host.run("APDMModelFromComfy", model=comfy_model, clip=clip, vae=vae, title="my merge")
    assert ("load_models_gpu", 2, True) in mm.calls and "unload_all_models" in mm.calls
    assert model.source == "" and model.kind == "sd1" and model.info["format"] == "memory"
    for ours, theirs in (
        (model.unet, ref.unet),
        (model.text_encoder, ref.text_encoder),
        (model.vae, ref.vae),
    ):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.is_inference() for p in model.unet.parameters())
    with torch.no_grad():  # what protection does to the engine's copy never reaches ComfyUI's weights
        for p in model.unet.parameters():
            p.add_(0.01)
    assert all(torch.equal(v, state[unet_p + k]) for k, v in comfy_model.model.ldm_unet.items())

    info = {
        "protect_config": ProtectConfig(instance_prompt="a photo of sks dog"),
        "protect_subject": [str(subject_dir)],
    }
    protected = dataclasses.replace(model, info={**model.info, **info}, _fingerprint=None)
    (path,) = host.run("APDMSaveProtectedCheckpoint", protected_model=protected, filename="apdm/graph",
                       overwrite=False)  # fmt: skip
    assert (
        Path(path)
        == Path(host.folder_paths.get_folder_paths("checkpoints")[0]) / "apdm" / "graph.safetensors"
    )
    out, unet = load_file(path), protected.unet.state_dict()
    assert set(out) == set(state) - {"alphas_cumprod"}  # what ComfyUI's Save Checkpoint would have written
    assert all(torch.equal(out[k], v) for k, v in state.items() if k in out and not k.startswith(unet_p))
    again = load_model(path, model_type="sd1").unet.state_dict()
    assert all(torch.equal(again[k], v.half().float()) for k, v in unet.items())  # the file's own fp16
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert (
        meta["modelspec.title"] == "my merge (protected with APDM)" and len(meta["apdm.source_sha256"]) == 64
    )
    assert json.loads(meta["apdm.subjects"])["count"] == 4 and Path(path).with_suffix(".md").exists()

    patched = host.run("APDMToComfyModel", protected_model=protected, strength=1.0, model=comfy_model)[0]
    got = patched.patched_state_dict()
    assert all(torch.allclose(got["diffusion_model." + k], v, atol=1e-3) for k, v in unet.items())
    with pytest.raises(InputError, match="my merge has no VAE"):
        host.run("APDMModelFromComfy", model=comfy_model, clip=clip, vae=VAE({}), title="my merge")


def test_save_a_diffusers_model_as_a_folder(host, graph):
    (path,) = host.run("APDMSaveProtectedCheckpoint", protected_model=graph["protected"], filename="prot_tiny.safetensors",
                       overwrite=False)  # fmt: skip
    assert Path(path) == Path(host.folder_paths.get_folder_paths("diffusers")[0]) / "prot_tiny"
    assert (Path(path) / "model_index.json").exists() and (Path(path) / "apdm_config.json").exists()
    assert "[diffusers] prot_tiny" in host.package.nodes.host.model_choices()


def test_protect_images_node_keeps_the_budget_and_resumes_after_cancel(host, graph):
    import numpy as np

    photos = [draw_photo(i) for i in range(2)]
    batch = host.package.nodes.host.to_image_batch(photos)
    run = {"model": graph["model"], "images": batch, "method": "aspl", "budget": 4,
           "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog", "steps": 3, "seed": 0,
           "advanced": "surrogate_steps: 1, pgd_steps: 1, num_class_images: 2, sample_steps: 2, lr: 1e-4"}  # fmt: skip
    seen = []

    def cancel_at_step_2(value, total, node_id):
        seen.append((value, total))
        if total == 3 and value == 2:
            host.mm.interrupt_current_processing(True)

    host.on_progress = cancel_at_step_2
    try:
        with pytest.raises(host.mm.InterruptProcessingException):
            host.run("APDMProtectImages", **run)
        host.on_progress, seen[:] = (lambda value, total, node_id: seen.append((value, total))), []
        protected, report = host.run("APDMProtectImages", **run)
        assert [v for v, t in seen if t == 3] == [3]  # resumed after iteration 2
    finally:
        host.on_progress = None
    size = graph["model"].native_resolution
    originals = [im.resize((size, size)) if im.size != (size, size) else im for im in photos]
    out = host.package.nodes.host.from_image_batch(protected)
    for o, p in zip(originals, out):
        assert np.abs(np.asarray(p, np.int16) - np.asarray(o.convert("RGB"), np.int16)).max() <= 4
    assert report.count("PSNR") == 2
    with pytest.raises(InputError, match="cannot be set"):
        host.run("APDMProtectImages", **{**run, "advanced": "output: /tmp/x"})


def test_add_subject_nodes_protect_two_subjects_in_one_run(host, graph):
    """Add Subject chains subjects (from a folder or an IMAGE batch) into Protect Model's more_subjects."""
    dog = host.folder_paths.get_input_directory() + "/rex"
    os.makedirs(dog, exist_ok=True)
    for i in range(3):
        draw_photo(30 + i).save(f"{dog}/rex_{i}.png")
    rex, _ = host.run("APDMLoadSubjectImages", folder="rex")
    (subjects,) = host.run("APDMAddSubject", subject=rex, instance_prompt="a photo of zwx dog",
                           class_prompt="a photo of dog")  # fmt: skip
    (subjects,) = host.run("APDMAddSubject", subject=graph["subject"], instance_prompt="a photo of qkv cat",
                           class_prompt="a photo of cat", subjects=subjects)  # fmt: skip
    assert [s["instance_prompt"] for s in subjects] == ["a photo of zwx dog", "a photo of qkv cat"]
    protected, _ = host.run("APDMProtectModel", model=graph["model"], subject=graph["subject"], pairs=graph["pairs"],
                            more_subjects=subjects, **{**FAST_PROTECT, "inner_steps": 1})  # fmt: skip
    history = protected.info["protect_history"]
    assert [h["subject"] for h in history] == [1, 2, 3]
    with pytest.raises(Exception, match="same identifier"):
        (twice,) = host.run("APDMAddSubject", subject=rex, instance_prompt="a photo of sks dog",
                            class_prompt="a photo of dog")  # fmt: skip
        host.run("APDMProtectModel", model=graph["model"], subject=graph["subject"], pairs=graph["pairs"],
                 more_subjects=twice, **FAST_PROTECT)  # fmt: skip


def test_a_second_round_against_the_original_model(host, graph):
    """original_model: a subject added to a protected MODEL takes its anchor from the original (the first
    step's anchor is already > 0: theta starts away from its reference); without it, from the protected one."""
    run = {"subject": graph["subject"], **FAST_PROTECT, "steps": 1,
           "advanced": "anchor_weight: 1.0\nanchor_prompts: ['a photo of dog']"}  # fmt: skip
    first, _ = host.run("APDMProtectModel", model=graph["model"], pairs=graph["pairs"],
                        **{**run, "learning_rate": 1e-2})  # fmt: skip
    first_pairs, _ = host.run("APDMGeneratePairs", model=first, subject=graph["subject"], **FAST_PAIRS)
    plain, _ = host.run("APDMProtectModel", model=first, pairs=first_pairs, **run)
    against, _ = host.run(
        "APDMProtectModel", model=first, original_model=graph["model"], pairs=graph["pairs"], **run
    )
    assert plain.info["protect_history"][0]["anchor"] == 0.0 < against.info["protect_history"][0]["anchor"]
    with pytest.raises(InputError, match="original model to Generate Pairs"):
        host.run("APDMProtectModel", model=first, original_model=graph["model"], pairs=first_pairs, **run)


def test_the_performance_preset_follows_the_gpu_memory(host, monkeypatch):
    """Protect Model's preset: auto picks by the device's memory (none on a CPU), an explicit choice is used."""
    import comfy.model_management as mm
    import torch

    from nodes import host as node_host

    assert node_host.performance_preset("auto") == "none"  # the fake ComfyUI runs on the CPU
    assert node_host.performance_preset("low-memory") == "low-memory"
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
    for gb, want in ((80, "fast"), (24, "low-memory")):
        monkeypatch.setattr(mm, "get_total_memory", lambda dev=None, gb=gb: gb * 2**30)
        assert node_host.performance_preset("auto") == want
    monkeypatch.setattr(mm, "get_total_memory", lambda dev=None: 12 * 2**30)
    assert node_host.performance_preset("auto") in (
        "low-memory",
        "low-memory-8bit",
    )  # 8-bit needs bitsandbytes
    for gb, want in ((24, "sdxl-24gb"), (40, "low-memory-8bit"), (80, "low-memory")):  # an SDXL model
        monkeypatch.setattr(mm, "get_total_memory", lambda dev=None, gb=gb: gb * 2**30)
        assert node_host.performance_preset("auto", xl=True) == want


def test_auto_preset_leaves_out_levers_the_demo_settings_cannot_run_with(host, graph, monkeypatch):
    """The example workflow's settings (the family preset: anchor and inner clipping) on a 24 GB GPU: auto
    picks low-memory but runs without offload_outer / optimizer_in_backward; an explicit choice is checked."""
    import comfy.model_management as mm
    import torch
    from comfy_workflow import PROTECT_WIDGETS

    from nodes import host as node_host

    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(mm, "get_total_memory", lambda dev=None: 24 * 2**30)
    monkeypatch.setattr(node_host, "device", lambda: "cpu")
    widgets = {k: v for k, v in PROTECT_WIDGETS.items() if k not in ("advanced", "steps", "learning_rate")}
    widgets["preset"] = "auto"
    config = node_host.protect_config(graph["pairs"], graph["model"], widgets, PROTECT_WIDGETS["advanced"])
    assert config.gradient_checkpointing and config.mixed_precision == "bf16" and config.anchor_weight > 0
    assert not config.offload_outer and not config.optimizer_in_backward
    widgets["preset"] = "low-memory"
    with pytest.raises(InputError, match="optimizer_in_backward|offload_outer"):
        node_host.protect_config(graph["pairs"], graph["model"], widgets, PROTECT_WIDGETS["advanced"])


def test_sdxl_checkpoint_through_the_nodes(host, tmp_path, monkeypatch):
    """An SDXL checkpoint from models/checkpoints: Load Model (auto-detected), Generate Pairs, Protect Model,
    Save Protected Checkpoint (SDXL layout, the other tensors kept byte for byte), and the protection as
    patches on ComfyUI's MODEL."""
    from ldm_layout import UNET, make_checkpoint, write_config_folder
    from safetensors.torch import load_file

    import apdm_core.detection as detection
    from apdm_core.checkpoint import read_checkpoint

    monkeypatch.setattr(detection, "CONFIG_ROOT", tmp_path / "configs")  # the tiny file's configs as "sdxl"
    write_config_folder(tmp_path / "configs" / "sdxl", "sdxl")
    ckpt_dir = Path(host.folder_paths.get_folder_paths("checkpoints")[0])
    source = make_checkpoint(ckpt_dir / "tiny-xl.safetensors", "sdxl")
    (model,) = host.run("APDMLoadModel", ckpt_name="tiny-xl.safetensors")
    assert model.is_xl and model.kind == "sdxl"
    photos = Path(host.folder_paths.get_input_directory()) / "xl_subject"
    photos.mkdir()
    for i in range(4):
        draw_photo(i).save(photos / f"img_{i}.png")
    subject, _ = host.run("APDMLoadSubjectImages", folder="xl_subject")
    pairs, _ = host.run("APDMGeneratePairs", model=model, subject=subject, **FAST_PAIRS)
    protected, _ = host.run("APDMProtectModel", unique_id="21", model=model, subject=subject, pairs=pairs,
                            **{**FAST_PROTECT, "steps": 2})  # fmt: skip
    (path,) = host.run(
        "APDMSaveProtectedCheckpoint", protected_model=protected, filename="apdm/xl", overwrite=False
    )
    out, state = load_file(path), load_file(source)
    assert set(out) == set(state) and read_checkpoint(Path(path)).metadata["apdm.model_type"] == "sdxl"
    changed = {k for k in out if not torch.equal(out[k], state[k])}
    assert changed and all(k.startswith(UNET) for k in changed)
    comfy_model = comfy_model_of(model.unet)
    patched = host.run("APDMToComfyModel", protected_model=protected, strength=1.0, model=comfy_model)[0]
    got = patched.patched_state_dict()
    assert all(
        torch.allclose(got["diffusion_model." + k], v, atol=1e-6)
        for k, v in protected.unet.state_dict().items()
    )
