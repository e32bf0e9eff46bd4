"""The Gradio UI (apdm_core.ui): the Blocks build, a headless run through the event functions,
the polite refusal of a second run, and the A1111 tab against a fake ``modules`` package."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tree_hashes

from apdm_core import ui
from apdm_core.config import ProtectConfig
from apdm_core.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
FAKES = Path(__file__).resolve().parent / "fakes"

FAST = dict(outer_steps=2, inner_steps=2, num_class_images=2, sample_steps=2, guidance_scale=2.0,
            lr_protect=1e-4, lr_personalize=1e-4, device="cpu", save_every=0)  # fmt: skip


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch):
    monkeypatch.setattr(ui.app, "POLL_S", 0.02)


def advanced_values(app, cache_dir, **overrides):
    values = dict(zip(ui.ADVANCED_FIELDS, app.preset_values("quick")))
    values.update(FAST, cache_dir=str(cache_dir), **overrides)
    return [values[name] for name in ui.ADVANCED_FIELDS]


FAST_ATTACK = dict(steps=2, lr=1e-3, num_class_images=2, sample_steps=2, device="cpu", save_every=0)
FAST_EVAL = dict(num_samples=2, eval_steps=2, metrics="denoise", denoise_timesteps="500", denoise_repeats=1)


def page_test_inputs(app, cache_dir, **overrides):
    """The Test inputs after the kind: AttackConfig fields, then EvalConfig fields, as the page holds them."""
    from apdm_core.attack import AttackConfig
    from apdm_core.evaluate.config import EvalConfig

    attack = {**app.initial_attack(), **FAST_ATTACK, "cache_dir": str(cache_dir), **overrides}
    evaluation = {**app.initial_evaluation(), **FAST_EVAL}
    return [ui.form_value(AttackConfig, n, attack[n]) for n in ui.attack_fields()] + [
        ui.form_value(EvalConfig, n, evaluation[n]) if n not in FAST_EVAL else FAST_EVAL[n]
        for n in ui.eval_fields()
    ]


def run_protect(app, model, folder, cache_dir, **overrides):
    views = list(
        app.protect_events(
            str(model),
            None,
            str(folder),
            "a photo of sks person",
            "a photo of person",
            *advanced_values(app, cache_dir, **overrides),
        )
    )
    return views


# ------------------------------------------------------------------------------------------
# the Blocks
# ------------------------------------------------------------------------------------------
def elem_ids(blocks) -> set[str]:
    return {b.elem_id for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


def test_blocks_build_with_every_config_field(tmp_path):
    gr = pytest.importorskip("gradio")
    blocks = ui.build_blocks(ui.ProtectApp(ui.Host(output_dir=tmp_path)))
    assert isinstance(blocks, gr.Blocks)
    ids = elem_ids(blocks)
    for name in ui.ADVANCED_FIELDS + ("model", "instance_prompt", "class_prompt"):
        assert f"apdm_{name}" in ids, name
    assert {"apdm_protect", "apdm_cancel", "apdm_status", "apdm_curve", "apdm_save"} <= ids
    assert {"apdm_test", "apdm_attack_kind", "apdm_grid", "apdm_losses", "apdm_summary"} <= ids
    assert {f"apdm_attack_{n}" for n in ui.attack_fields()} | {
        f"apdm_eval_{n}" for n in ui.eval_fields()
    } <= ids
    # every ProtectConfig field is in the page except the file paths (the output is named by Save; the
    # cache, state and class-image folders are the host's): a page on a network names no path
    from apdm_core.config import PATH_FIELDS

    fields_on_page = set(ui.ADVANCED_FIELDS) | set(ui.MAIN_FIELDS)
    assert fields_on_page | PATH_FIELDS >= {f for f in ProtectConfig().to_dict()}
    assert not {f"apdm_{n}" for n in PATH_FIELDS - set(ui.MAIN_FIELDS)} & ids
    assert (
        not {f"apdm_attack_{n}" for n in PATH_FIELDS} & ids
        and not {f"apdm_eval_{n}" for n in PATH_FIELDS} & ids
    )


def test_advanced_fields_follow_the_config_metadata(tmp_path):
    gr = pytest.importorskip("gradio")
    blocks = ui.build_blocks(ui.ProtectApp(ui.Host(output_dir=tmp_path, preset="paper")))
    by_id = {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}
    loss = by_id["apdm_loss"]
    assert isinstance(loss, gr.Dropdown) and [c[0] if isinstance(c, tuple) else c for c in loss.choices] == [
        "dpo",
        "naive",
        "target",
    ]
    assert isinstance(by_id["apdm_model_type"], gr.Dropdown)  # a choice on the page, never a folder
    assert isinstance(by_id["apdm_outer_steps"], gr.Number) and by_id["apdm_outer_steps"].value == 800
    assert isinstance(by_id["apdm_device"], gr.Textbox)


GRADIO3_SCRIPT = """
import sys, gradio as gr
sys.path.insert(0, sys.argv[1])
from apdm_core import ui
assert gr.__version__ == "3.41.2", gr.__version__
blocks = ui.build_blocks(ui.ProtectApp(ui.Host(output_dir=sys.argv[2])))
config = blocks.get_config_file()
ids = {c["props"].get("elem_id") for c in config["components"]}
missing = [n for n in ui.ADVANCED_FIELDS if "apdm_" + n not in ids]
missing += [n for n in ui.attack_fields() if "apdm_attack_" + n not in ids]
assert not missing, missing
print("built", len(config["components"]), "components with gradio", gr.__version__)
"""


def test_blocks_build_under_gradio_3_41(tmp_path):
    """A1111 1.10 pins gradio 3.41.2: build the same Blocks in a python that has it
    (APDM_GRADIO3_PYTHON, e.g. a venv with `pip install -c constraints.txt gradio==3.41.2`)."""
    python = os.environ.get("APDM_GRADIO3_PYTHON")
    if not python:
        pytest.skip("set APDM_GRADIO3_PYTHON to a python with gradio==3.41.2 to test the A1111 Gradio")
    proc = subprocess.run(
        [python, "-c", GRADIO3_SCRIPT, str(ROOT), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with gradio 3.41.2" in proc.stdout


# ------------------------------------------------------------------------------------------
# the event functions, headless
# ------------------------------------------------------------------------------------------
def test_headless_protect_test_and_save(tiny_model_dir, subject_dir, tmp_path):
    before = tree_hashes(tiny_model_dir, subject_dir)
    app = ui.ProtectApp(ui.Host(output_dir=tmp_path / "models", report_dir=tmp_path / "reports"))
    views = list(app.test_events("lora", *page_test_inputs(app, tmp_path / "cache")))
    assert "Protect a model first" in views[-1].status
    gallery, notes = app.inspect_images(None, str(subject_dir))
    assert len(gallery) == 4 and notes.startswith("4 image(s) ready")
    views = run_protect(app, tiny_model_dir, subject_dir, tmp_path / "cache")
    assert views[0].running and not views[-1].running and views[-1].done
    assert "Protected in" in views[-1].status, views[-1].status
    assert views[-1].curve is not None and views[-1].curve.size[0] > 100  # the loss curve image
    assert views[-1].filename == "tiny-apdm"
    filename = views[-1].filename
    assert app.protected.steps_done == 2 and len(app.protected.history) == 2

    # Test personalization: the same LoRA attack on the original and the protected model -> a report
    views = list(app.test_events("lora", *page_test_inputs(app, tmp_path / "cache")))
    assert "Report written to" in views[-1].status, views[-1].status
    report = views[-1].report
    assert report["grid"].size[0] > 100 and report["losses"].size[0] > 100
    assert "| denoise |" in report["summary"] and report["folder"].parent == tmp_path / "reports"
    assert (report["folder"] / "report.json").exists()
    assert set(app.job.curves) == {"attack", "attack #2"}  # one loss curve per attacked model
    assert app.job.names == {"attack": "unprotected + attack", "attack #2": "protected + attack"}

    message = app.save(filename)
    out = tmp_path / "models" / "tiny-apdm"
    assert message == f"Saved to {out}" and (out / "unet").is_dir()
    config = ProtectConfig.load(out / "apdm_config.json")  # the settings, without local paths
    assert (
        config.outer_steps == 2
        and config.model == ""
        and str(tmp_path) not in (out / "apdm_config.json").read_text()
    )
    assert "already exists" in app.save("tiny-apdm")  # never over an existing file
    assert tree_hashes(tiny_model_dir, subject_dir) == before  # inputs only read


def test_bad_input_is_one_clear_message(tiny_model_dir, tmp_path):
    app = ui.ProtectApp(ui.Host(output_dir=tmp_path))
    views = run_protect(app, tiny_model_dir, tmp_path / "missing", tmp_path / "cache")
    assert len(views) == 1 and views[0].done and "does not exist" in views[0].status
    views = run_protect(app, "", tmp_path, tmp_path / "cache")
    assert "Choose the model" in views[0].status
    values = advanced_values(app, tmp_path / "cache")
    values[ui.ADVANCED_FIELDS.index("outer_steps")] = None
    views = list(app.protect_events(str(tiny_model_dir), None, str(tmp_path), "a", "b", *values))
    assert "outer_steps is empty" in views[0].status
    assert app.save("x") == "Nothing to save yet: protect a model first."


def test_inspect_images_flags_unreadable_and_small_ones(tmp_path):
    from helpers import draw_photo

    draw_photo(0, size=300).save(tmp_path / "big.png")
    draw_photo(1, size=64).save(tmp_path / "small.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    items, notes = ui.ProtectApp().inspect_images([str(tmp_path / "big.png")], str(tmp_path))
    assert [caption for _, caption in items] == [
        "big.png (300x300)",
        "big.png (300x300)",
        "small.png (64x64)",
    ]
    assert "broken.jpg cannot be read" in notes
    assert "too small for Stable Diffusion (fine for the tiny demo model): small.png (64x64)" in notes


def test_second_click_is_refused_and_cancel_stops_and_resumes(tiny_model_dir, subject_dir, tmp_path):
    app = ui.ProtectApp(ui.Host(output_dir=tmp_path))
    first = app.protect_events(
        str(tiny_model_dir), None, str(subject_dir), "a photo of sks person", "a photo of person",
        *advanced_values(app, tmp_path / "cache", outer_steps=2000),
    )  # fmt: skip
    view = next(first)
    assert view.running
    while app.job.event is None or app.job.event.stage != "protect":
        view = next(first)
    second = app.protect_events(str(tiny_model_dir), None, str(subject_dir), "a", "b",
                                *advanced_values(app, tmp_path / "other"))  # fmt: skip
    assert "already in progress" in next(second).status  # refused; it shows the running job's progress
    second.close()
    assert app.cancel().startswith("Stopping the protection run")
    rest = list(first)
    assert not rest[-1].running and "Stopped after" in rest[-1].status
    result = app.job.result
    assert result.cancelled and result.steps_done < 2000 and result.state_path.exists()
    assert app.protected is None and app.cancel() == "Nothing is running."
    # the same settings again continue from the saved state instead of starting over
    views = run_protect(
        app, tiny_model_dir, subject_dir, tmp_path / "cache", outer_steps=result.steps_done + 1
    )
    assert "Protected in" in views[-1].status and app.protected.steps_done == result.steps_done + 1
    assert len(app.job.curves["protect"]) == 2  # only the one new outer step was computed (2 inner steps)


def test_preset_values_fill_the_advanced_fields():
    app = ui.ProtectApp(ui.Host(preset="quick", config={"device": "cpu", "outer_steps": 7}))
    first = app.initial_values()  # the preset, then the host's settings (e.g. `apdm ui --config`)
    assert first["outer_steps"] == 7 and first["inner_steps"] == 10 and first["device"] == "cpu"
    thorough = dict(zip(ui.ADVANCED_FIELDS, app.preset_values("thorough")))  # a preset click
    assert thorough["outer_steps"] == 1200 and thorough["device"] == "auto"
    low = dict(zip(ui.ADVANCED_FIELDS, app.preset_values("low-memory")))  # the GPU presets are offered too
    assert low["gradient_checkpointing"] is True and low["mixed_precision"] == "bf16"


def test_fields_round_trip_through_the_page_components():
    from apdm_core.attack import AttackConfig
    from apdm_core.evaluate.config import EvalConfig

    assert ui.parse_field(AttackConfig, "steps", "") is None  # Optional: empty = the attack's default
    assert ui.parse_field(AttackConfig, "steps", 12.0) == 12
    assert ui.parse_field(AttackConfig, "lora_targets", "to_k, to_q") == ["to_k", "to_q"]
    assert ui.parse_field(EvalConfig, "denoise_timesteps", "100,500") == [100, 500]
    assert ui.parse_field(AttackConfig, "random_flip", True) is True
    for bad, message in ((("lr_protect", ""), "is empty"), (("outer_steps", "2.5"), "not a valid int")):
        with pytest.raises(InputError, match=message):
            ui.parse_field(ProtectConfig, *bad)
    with pytest.raises(InputError, match="separated by commas"):
        ui.parse_field(EvalConfig, "denoise_timesteps", "100, x")
    values = AttackConfig().to_dict()
    assert {
        n: ui.parse_field(AttackConfig, n, ui.form_value(AttackConfig, n, values[n]))
        for n in ui.attack_fields()
    } == {n: values[n] for n in ui.attack_fields()}
    assert ui.attack_prompts("a photo of zwx dog", "a photo of dog") == {
        "instance_prompt": "a photo of zwx dog", "class_prompt": "a photo of dog", "identifier": "zwx"}  # fmt: skip


def test_cli_registers_ui_and_binds_localhost_by_default(monkeypatch):
    from apdm_core import cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", ["apdm_core.ui"])
    args = cli.build_parser().parse_args(["ui"])
    assert args.func is ui.cmd_ui and args.host == "127.0.0.1"
    assert cli.build_parser().parse_args(["ui", "--host", "0.0.0.0", "--port", "7999"]).port == 7999


def test_ui_demo_opens_on_the_demo_world(monkeypatch, tmp_path):
    from apdm_core import cli
    from apdm_core.world import WORLD_MODEL_DIR

    seen = {}
    monkeypatch.setattr(ui.cli, "launch", lambda *a, **kw: seen.update(args=a, kw=kw))
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["apdm_core.ui"])
    args = cli.build_parser().parse_args(["ui", "--demo", "--out-dir", str(tmp_path / "models")])
    assert ui.cmd_ui(args) == 0
    config = seen["args"][-1]
    assert config.model == str(WORLD_MODEL_DIR) and config.instance_prompt == "a photo of sks ball"
    assert len(list((tmp_path / "demo" / "subject").glob("*.png"))) == 4 and not config.output


# ------------------------------------------------------------------------------------------
# A1111 / Forge, against a fake `modules` package
# ------------------------------------------------------------------------------------------
@pytest.fixture()
def a1111(monkeypatch, tmp_path):
    """scripts/apdm_tab.py loaded against tests/fakes/modules, with a tiny SD1 checkpoint in the webui's list."""
    from ldm_layout import make_checkpoint, write_config_folder

    monkeypatch.syspath_prepend(str(FAKES))
    for name in [m for m in sys.modules if m == "modules" or m.startswith("modules.")]:
        monkeypatch.delitem(sys.modules, name)
    from modules import paths, script_callbacks, sd_models

    monkeypatch.setattr(paths, "data_path", str(tmp_path))
    models = tmp_path / "models" / "Stable-diffusion"
    make_checkpoint(models / "tiny.safetensors", "sd1")
    monkeypatch.setattr(sd_models, "model_path", str(models))
    sd_models.list_models()
    spec = importlib.util.spec_from_file_location("apdm_tab_under_test", ROOT / "scripts" / "apdm_tab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # the tiny checkpoint's shapes are not SD1.5's: its config folder is the model type
    module.model_type = str(write_config_folder(tmp_path / "tiny-cfg", "sd1"))
    yield module, script_callbacks
    for name in [m for m in sys.modules if m == "modules" or m.startswith("modules.")]:
        sys.modules.pop(name)


def test_a1111_tab_registers_with_title_and_id(a1111):
    gr = pytest.importorskip("gradio")
    module, script_callbacks = a1111
    assert script_callbacks.ui_tabs_callbacks == [module.on_ui_tabs]
    [(blocks, title, elem_id)] = module.on_ui_tabs()
    assert (
        isinstance(blocks, gr.Blocks) and title == "Anti-Personalize" and elem_id == "apdm_anti_personalize"
    )
    model = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "apdm_model")
    assert isinstance(model, gr.Dropdown)  # the webui's checkpoint list, not a path box


def test_a1111_interrupt_stops_the_run_and_restores_the_model(a1111, subject_dir, tmp_path):
    module, _ = a1111
    from modules import call_queue, sd_models, shared

    host = module.A1111Host()
    app = ui.ProtectApp(host)
    title = sd_models.checkpoint_tiles()[0]
    assert host.resolve_model(title) == os.path.join(sd_models.model_path, "tiny.safetensors")
    seen = {}
    events = app.protect_events(
        title, None, str(subject_dir), "a photo of sks person", "a photo of person",
        *advanced_values(app, tmp_path / "cache", outer_steps=2000, model_type=module.model_type),
    )  # fmt: skip
    for view in events:
        if view.running and shared.state.job_no > 0 and not seen:
            seen = {"lock": call_queue.queue_lock.locked(), "device": sd_models.model_data.sd_model.device,
                    "job": shared.state.job, "count": shared.state.job_count, "text": shared.state.textinfo}  # fmt: skip
            shared.state.interrupt()  # what A1111's Interrupt button does
    assert seen["lock"] and seen["device"] == "cpu" and seen["job"] == "apdm-protection"
    assert seen["count"] >= 1 and seen["text"].startswith("APDM ")
    assert "Stopped after" in view.status and app.job.result.cancelled
    assert app.job.result.steps_done < 2000
    assert sd_models.model_data.sd_model.moves == ["cpu", "cuda"]  # moved off the GPU and back
    assert not call_queue.queue_lock.locked() and not shared.state.interrupted and shared.state.job == ""


def test_a1111_save_goes_to_the_checkpoint_folder_and_refreshes_the_list(a1111, subject_dir, tmp_path):
    module, _ = a1111
    from modules import sd_models

    from apdm_core.export_cli import inspect_checkpoint

    app = ui.ProtectApp(module.A1111Host())
    views = run_protect(app, sd_models.checkpoint_tiles()[0], subject_dir, tmp_path / "cache",
                        model_type=module.model_type)  # fmt: skip
    assert "Protected in" in views[-1].status, views[-1].status
    assert views[-1].filename == "tiny-apdm.safetensors"  # a single file, like its source
    assert "without folders" in app.save("../elsewhere.safetensors")
    calls = len(sd_models.list_calls)
    out = Path(sd_models.model_path) / "tiny-apdm.safetensors"
    assert app.save(views[-1].filename) == f"Saved to {out}"
    assert len(sd_models.list_calls) == calls + 1
    assert any(t.startswith("tiny-apdm.safetensors ") for t in sd_models.checkpoint_tiles())
    recipe = inspect_checkpoint(out, model_type=module.model_type)["apdm"]  # the recipe is in its metadata
    assert recipe["protected"] == "true" and recipe["config"]["outer_steps"] == 2


def test_network_host_needs_auth(monkeypatch, tmp_path):
    """A page served to the network reads and writes files: a login, or an explicit --no-auth."""
    from apdm_core import cli

    seen = {}
    monkeypatch.setattr(ui.cli, "launch", lambda *a, **kw: seen.update(kw=kw))
    parse = cli.build_parser().parse_args
    with pytest.raises(InputError, match="--auth USER:PASSWORD"):
        ui.cmd_ui(parse(["ui", "--host", "0.0.0.0"]))
    with pytest.raises(InputError, match="USER:PASSWORD"):
        ui.cmd_ui(parse(["ui", "--host", "0.0.0.0", "--auth", "alice"]))
    assert ui.cmd_ui(parse(["ui", "--host", "0.0.0.0", "--auth", "alice:pw"])) == 0
    assert seen["kw"]["auth"] == ("alice", "pw")
    assert ui.cmd_ui(parse(["ui", "--host", "0.0.0.0", "--no-auth"])) == 0 and seen["kw"]["auth"] is None
    assert ui.cmd_ui(parse(["ui"])) == 0 and seen["kw"]["auth"] is None  # this machine only


def test_quitting_the_app_stops_the_running_job(tmp_path):
    app = ui.ProtectApp(ui.Host(output_dir=tmp_path))
    started = []

    def work(progress, should_stop):
        started.append(1)
        while not should_stop():
            time.sleep(0.01)
        return "stopped cleanly"

    app.job = ui.Job("protect", work, app.host).start()
    while not started:
        time.sleep(0.01)
    assert app.shutdown(timeout=10) and app.job.result == "stopped cleanly"


def test_a_page_opened_on_settings_selects_no_preset(tmp_path):
    """`apdm ui --demo` / `--config`: the page shows those settings and no preset radio selected."""
    from apdm_core.world import efficacy

    plain = ui.page_host("", "", tmp_path, None)
    assert plain.preset == "quick"
    config = ProtectConfig(model="m", images=["a.png"], device="cpu", **efficacy.PROTECT_SETTINGS)
    page = ui.page_host("", "", tmp_path, config)
    assert page.preset == "" and page.model == "m" and page.images == "a.png"
    first = ui.ProtectApp(page).initial_values()
    assert (
        first["outer_steps"] == efficacy.PROTECT_SETTINGS["outer_steps"]
        and first["attacker_family"] == ["full", "lora"]
        and first["loss"] == "target"
        and first["protect_layers"] == "cross_attention"
    )
    blocks = ui.build_blocks(ui.ProtectApp(page))
    radio = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "apdm_preset")
    assert radio.value is None and "robust" in radio.choices[2]


def test_protect_photos_writes_a_new_folder_and_shows_them(tiny_model_dir, subject_dir, tmp_path):
    import numpy as np
    from PIL import Image

    before = tree_hashes(tiny_model_dir, subject_dir)
    app = ui.ProtectApp(ui.Host(output_dir=tmp_path / "models", report_dir=tmp_path / "reports"))
    views = list(app.protect_images_events(str(tiny_model_dir), None, str(subject_dir), "a photo of sks dog",
                                           "a photo of dog", "ldu", 6, 2))  # fmt: skip
    assert "4 protected photos written to" in views[-1].status, views[-1].status
    report = views[-1].report
    assert report["grid"].size[0] > 0 and "| photo | PSNR" in report["summary"]
    out = report["folder"]
    assert out.parent == tmp_path / "models" / "protected-photos" and len(list(out.glob("*.png"))) == 4
    for path in out.glob("*.png"):
        assert np.asarray(Image.open(path)).shape[-1] == 3
    assert tree_hashes(tiny_model_dir, subject_dir) == before
    views = list(app.protect_images_events(str(tiny_model_dir), None, "", "a", "b", "ldu", 6, 2))
    assert "Add the photos" in views[-1].status


def test_more_subjects_from_the_page(tiny_model_dir, subject_dir, tmp_path):
    """One subject per line of the more-subjects box joins the run; a malformed line is one clear message."""
    app = ui.ProtectApp(ui.Host(output_dir=tmp_path))
    values = advanced_values(app, tmp_path / "cache", outer_steps=2)
    line = f"{subject_dir} | a photo of zwx dog | a photo of dog"
    views = list(app.protect_events(str(tiny_model_dir), None, str(subject_dir), "a photo of sks person",
                                    "a photo of person", *values, line))  # fmt: skip
    assert "Protected in" in views[-1].status
    assert [h["subject"] for h in app.protected.history] == [1, 2]
    views = list(app.protect_events(str(tiny_model_dir), None, str(subject_dir), "a photo of sks person",
                                    "a photo of person", *values, "just a folder"))  # fmt: skip
    assert "More subjects, line 1" in views[0].status


def test_a_second_round_from_the_page_against_the_original_model(tiny_model_dir, subject_dir, tmp_path):
    """The Original model box: a protected model protected again takes its reference from the original
    (reference_model in the run's config; the anchor is > 0 from the first step); an unknown one is refused."""
    app = ui.ProtectApp(ui.Host(output_dir=tmp_path))
    values = advanced_values(app, tmp_path / "cache", outer_steps=1, lr_protect=1e-2, anchor_weight=1.0)
    prompts = ("a photo of sks person", "a photo of person")
    views = list(app.protect_events(str(tiny_model_dir), None, str(subject_dir), *prompts, *values, ""))
    assert "Protected in" in views[-1].status
    first = tmp_path / "first"
    app.protected.model.pipeline().save_pretrained(first, safe_serialization=True)
    views = list(
        app.protect_events(str(first), None, str(subject_dir), *prompts, *values, "", str(tiny_model_dir))
    )
    assert "Protected in" in views[-1].status
    assert app.protected.config.reference_model == str(tiny_model_dir)
    assert app.protected.history[0]["anchor"] > 0.0
    views = list(app.protect_events(str(first), None, str(subject_dir), *prompts, *values, "", " "))
    assert "Original model" in views[0].status


def test_a1111_tab_opens_on_the_loaded_checkpoint_registers_tasks_settings_and_previews(
    a1111, subject_dir, tmp_path
):
    module, script_callbacks = a1111
    from modules import progress, sd_models, shared

    # a settings section: default preset, output folder, preview interval
    assert script_callbacks.ui_settings_callbacks == [module.on_ui_settings]
    module.on_ui_settings()
    assert {"apdm_default_preset", "apdm_output_dir", "apdm_preview_every"} <= set(shared.opts.data_labels)
    assert shared.opts.data_labels["apdm_output_dir"].section == ("apdm", "Anti-Personalize")
    title = sd_models.checkpoint_tiles()[0]
    shared.opts.data.update(sd_model_checkpoint=title, apdm_preview_every=1, apdm_default_preset="paper",
                            apdm_output_dir=str(tmp_path / "mine"))  # fmt: skip
    host = module.A1111Host()
    assert host.model == title and host.preset == "paper" and host.output_dir == tmp_path / "mine"
    app = ui.ProtectApp(host)
    queued = len(progress.queued)
    views = run_protect(app, title, subject_dir, tmp_path / "cache", model_type=module.model_type)
    assert "Protected in" in views[-1].status
    (task,) = progress.queued[queued:]
    assert task.startswith("task(apdm-protection-") and task in progress.started and task in progress.finished
    assert progress.current_task is None
    assert shared.state.images and shared.state.images[-1].size[0] > 100  # the loss curve as live preview


def test_loss_curves_start_a_series_where_a_stage_restarts_in_every_host(a1111):
    """The app's job, the ComfyUI node's preview and the A1111 preview share one accumulator: the second
    attack of a test (its step counter restarts) is its own series, and A1111 previews it too."""
    from modules import shared

    from apdm_core.progress import ProgressEvent

    events = [ProgressEvent("attack", s, 3, losses={"loss": 1.0 / s}) for s in (1, 2, 3, 1, 2)]
    curves = ui.LossCurves()
    for e in [ProgressEvent("attack", 0, 3), *events]:  # an event without losses adds nothing
        curves.add(e)
    assert {k: [s for s, _ in v] for k, v in curves.series.items()} == {
        "attack": [1, 2, 3],
        "attack #2": [1, 2],
    }

    module, _ = a1111
    module.on_ui_settings()
    shared.opts.data.update(apdm_preview_every=2)
    host = module.A1111Host()
    shown = len(shared.state.images)
    for e in events:
        host.progress(e)
    assert set(host._curves.series) == {"attack", "attack #2"}
    assert len(shared.state.images) - shown == 2  # at step 2 of the first attack and step 1 of the second


def test_a1111_tab_protects_tests_and_saves_an_sdxl_checkpoint(a1111, subject_dir, tmp_path):
    """An SDXL checkpoint in the webui's list takes the same path as SD1: protect, test, save as one file."""
    from ldm_layout import make_checkpoint, write_config_folder
    from modules import sd_models

    from apdm_core.export_cli import inspect_checkpoint

    module, _ = a1111
    make_checkpoint(Path(sd_models.model_path) / "tiny-xl.safetensors", "sdxl")
    sd_models.list_models()
    xl_type = str(write_config_folder(tmp_path / "xl-cfg", "sdxl"))  # the tiny file's shapes
    app = ui.ProtectApp(module.A1111Host())
    title = next(t for t in sd_models.checkpoint_tiles() if t.startswith("tiny-xl"))
    views = run_protect(app, title, subject_dir, tmp_path / "cache", model_type=xl_type)
    assert "Protected in" in views[-1].status, views[-1].status
    filename = views[-1].filename
    assert app.protected.model.is_xl and filename == "tiny-xl-apdm.safetensors"
    views = list(app.test_events("dreambooth", *page_test_inputs(app, tmp_path / "cache")))
    assert "Report written to" in views[-1].status, views[-1].status
    out = Path(sd_models.model_path) / filename
    assert app.save(filename) == f"Saved to {out}"
    info = inspect_checkpoint(out, model_type=xl_type)
    assert info["model_type"] == "sdxl" and info["apdm"]["protected"] == "true"
