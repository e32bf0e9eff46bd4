"""The Gradio Blocks: layout and wiring (Gradio imported only here and in ``cli.launch``)."""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace
from typing import Any

from ..config import ProtectConfig
from ..configio import config_field as _field
from ..images.config import IMAGE_METHODS
from .app import ProtectApp
from .forms import (
    ADVANCED_FIELDS,
    GROUP_TITLES,
    TITLE,
    UI_CHOICES,
    _base_type,
    attack_fields,
    attack_prompts,
    eval_fields,
    form_value,
)
from .jobs import View

INTRO = (
    "### APDM: protect a model against personalization\n"
    "Pick a model and 4-6 photos of the subject, press **Protect**; then test that DreamBooth on the "
    "protected model fails, and save it. ([paper](https://arxiv.org/abs/2511.01307))"
)


def _gradio_major(gr) -> int:
    return int(str(gr.__version__).split(".", 1)[0])


def _event_options(gr) -> dict:
    """Event arguments for long streams: Gradio >= 4 lets them run beside each other so that a second
    click reaches the app (which refuses it politely) instead of waiting in the queue."""
    return {"concurrency_limit": None} if _gradio_major(gr) >= 4 else {}


def _field_component(gr, cls, name: str, value: Any, prefix: str = "apdm_", choices=None):
    """One component for one config field: its help as info, its choices as a dropdown."""
    meta = _field(cls, name).metadata
    typ, optional = _base_type(cls, name)
    info = meta["help"] + (" Empty = the default." if optional else "")
    kw = {"label": name, "info": info, "elem_id": f"{prefix}{name}"}
    choices = choices or meta.get("choices") or UI_CHOICES.get(name)
    if choices:
        return gr.Dropdown(choices=list(choices), value=value, **kw)
    if typ is bool:
        return gr.Checkbox(value=bool(value), **kw)
    if typ in (int, float) and not optional:
        return gr.Number(value=value, precision=0 if typ is int else None, **kw)
    return gr.Textbox(value=form_value(cls, name, value), **kw)


def _field_group(gr, cls, names, values: dict, prefix: str) -> list:
    """The fields ``names`` of ``cls`` under their group titles; the components in ``names`` order."""
    made = {}
    for group in dict.fromkeys(_field(cls, n).metadata["group"] for n in names):
        gr.Markdown(f"**{GROUP_TITLES.get(group, group.capitalize())}**")
        for name in names:
            if _field(cls, name).metadata["group"] == group:
                made[name] = _field_component(gr, cls, name, values[name], prefix)
    return [made[name] for name in names]


def build_blocks(app: ProtectApp | None = None):
    """The whole page as a gr.Blocks (A1111 renders it in a tab; ``launch`` serves it alone): the
    inputs and settings on the left, running, testing and saving on the right, then the wiring."""
    import gradio as gr

    app = app or ProtectApp()
    c = SimpleNamespace()  # the components, by name
    with gr.Blocks(analytics_enabled=False, title=f"APDM {TITLE}") as blocks:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                _model_and_photos(gr, app, c)
                _settings(gr, app, c)
                _photo_protection(gr, app, c)
            with gr.Column():
                _run_panel(gr, app, c)
                _test_panel(gr, app, c)
                _save_panel(gr, app, c)
        _wire(gr, app, blocks, c)
    blocks.apdm_app = app  # for tests and hosts that want the event functions
    return blocks


def _model_and_photos(gr, app: ProtectApp, c) -> None:
    """The model (a host dropdown or a path), the subject photos and their preview, the two prompts."""
    host, start = app.host, app.initial_values()
    meta = {f.name: f.metadata for f in fields(ProtectConfig)}
    choices = host.model_choices()
    c.refresh = None
    if choices is None:
        c.model = gr.Textbox(
            label="Model", value=host.model, info=meta["model"]["help"], elem_id="apdm_model"
        )
    else:
        with gr.Row():
            value = host.model if host.model in choices else (choices[0] if choices else None)
            c.model = gr.Dropdown(choices=choices, label="Checkpoint", elem_id="apdm_model", value=value)
            c.refresh = gr.Button("Refresh list", elem_id="apdm_refresh_models")
    c.files = gr.File(label="Subject images (4-6 photos)", file_count="multiple", file_types=["image"])
    c.folder = gr.Textbox(
        label="…or a folder of subject images (several paths: separate them with ;)",
        value=host.images,
        elem_id="apdm_folder",
    )
    c.gallery = gr.Gallery(
        label="Subject images as they will be used", columns=6, height=240, elem_id="apdm_gallery"
    )
    c.image_notes = gr.Markdown(elem_id="apdm_image_notes")
    c.instance = gr.Textbox(
        label="Instance prompt",
        value=start["instance_prompt"],
        info=meta["instance_prompt"]["help"],
        elem_id="apdm_instance_prompt",
    )
    c.klass = gr.Textbox(
        label="Class prompt",
        value=start["class_prompt"],
        info=meta["class_prompt"]["help"],
        elem_id="apdm_class_prompt",
    )
    c.more_subjects = gr.Textbox(
        label="More subjects in the same run (optional): one per line, 'folder | instance prompt | class prompt'",
        lines=2, elem_id="apdm_more_subjects",
        info="Each with its own identifier, e.g. '/photos/rex | a photo of zwx dog | a photo of dog'.",
    )  # fmt: skip
    original = {"label": "Original model (optional): when the model above is already protected, the model it was "
                "protected from", "info": meta["reference_model"]["help"], "elem_id": "apdm_original_model"}  # fmt: skip
    if choices is None:
        c.original = gr.Textbox(value="", **original)
    else:
        c.original = gr.Dropdown(choices=["", *choices], value="", **original)


def _settings(gr, app: ProtectApp, c) -> None:
    """The preset and every other setting, grouped as the config groups them."""
    c.preset = gr.Radio(
        choices=list(app.host.presets),
        value=app.host.preset or None,  # none selected: the page opened on its own settings
        label="Preset",
        elem_id="apdm_preset",
        info="quick: a first look (100 x 10 steps); paper: the paper's settings (800 x 20); "
        "robust: the levers that held in the demo world (README, Protection that holds); "
        "thorough: 1200 x 20. Fills the Advanced settings.",
    )
    with gr.Accordion("Advanced", open=False):
        c.advanced = _field_group(gr, ProtectConfig, ADVANCED_FIELDS, app.initial_values(), "apdm_")


def _photo_protection(gr, app: ProtectApp, c) -> None:
    """Image-level protection of the same photos (ASPL / LDU)."""
    with gr.Accordion("Protect the photos instead (image-level: ASPL / LDU)", open=False):
        gr.Markdown(
            "For photos you post where you do not control the model: a bounded perturbation of the "
            "photos above (the model is the surrogate). Written as PNGs to a new folder under "
            f"`{app.host.output_dir}/protected-photos`. README: Image-level protection."
        )
        with gr.Row():
            c.image_method = gr.Dropdown(
                choices=list(IMAGE_METHODS), value="aspl", label="Method", elem_id="apdm_image_method"
            )
            c.image_budget = gr.Slider(
                1, 32, value=8, step=1, label="Budget (/255)", elem_id="apdm_image_budget"
            )
            c.image_steps = gr.Number(value=50, precision=0, label="Iterations", elem_id="apdm_image_steps")
        c.images_btn = gr.Button("Protect photos", elem_id="apdm_protect_images")


def _run_panel(gr, app: ProtectApp, c) -> None:
    with gr.Row():
        c.protect_btn = gr.Button("Protect", variant="primary", elem_id="apdm_protect")
        c.cancel_btn = gr.Button("Cancel", interactive=False, elem_id="apdm_cancel")
    c.status = gr.HTML(app.view().status, elem_id="apdm_status")
    c.curve = gr.Image(label="Losses", type="pil", interactive=False, elem_id="apdm_curve")


def _test_panel(gr, app: ProtectApp, c) -> None:
    """Test personalization: the attack and evaluation settings, the report's grid, curves and summary."""
    from ..attack import AttackConfig, registered_attacks
    from ..evaluate.config import EvalConfig

    start_attack = app.initial_attack()
    gr.Markdown(
        "**Test personalization**: attack the original and the protected model the same "
        "way and compare (report grid, loss curves, metrics)."
    )
    with gr.Row():
        c.kind = gr.Dropdown(
            choices=list(registered_attacks()),
            value=start_attack["kind"],
            label="Attack",
            info=_field(AttackConfig, "kind").metadata["help"],
            elem_id="apdm_attack_kind",
        )
        c.test_btn = gr.Button("Test personalization", elem_id="apdm_test")
    with gr.Accordion("Attack and evaluation settings", open=False):
        c.names_a = attack_fields()
        c.attack_inputs = _field_group(gr, AttackConfig, c.names_a, start_attack, "apdm_attack_")
        c.eval_inputs = _field_group(gr, EvalConfig, eval_fields(), app.initial_evaluation(), "apdm_eval_")
    c.grid = gr.Image(label="Samples after the attack", type="pil", interactive=False, elem_id="apdm_grid")
    c.losses = gr.Image(label="Loss curves", type="pil", interactive=False, elem_id="apdm_losses")
    c.summary = gr.Markdown(elem_id="apdm_summary")


def _save_panel(gr, app: ProtectApp, c) -> None:
    gr.Markdown(f"**Save** (into `{app.host.output_dir}`; a `.safetensors` name writes one file)")
    with gr.Row():
        c.filename = gr.Textbox(label="File name", elem_id="apdm_filename")
        c.save_btn = gr.Button("Save", elem_id="apdm_save")
    c.saved = gr.Markdown(elem_id="apdm_saved")


def _updates(gr, view: View) -> tuple:
    """A job's View as updates of the run outputs (status, curve, buttons, file name, report)."""
    report = view.report or {}
    keep = gr.update()
    return (
        gr.update(value=view.status),
        gr.update(value=view.curve) if view.curve is not None else keep,
        gr.update(interactive=not view.running),
        gr.update(interactive=not view.running),
        gr.update(interactive=view.running),
        gr.update(value=view.filename) if view.filename else keep,
        gr.update(value=report["grid"]) if report else keep,
        gr.update(value=report["losses"]) if report.get("losses") is not None else keep,
        gr.update(value=report["summary"]) if report else keep,
    )


def _wire(gr, app: ProtectApp, blocks, c) -> None:
    """The events: jobs stream their views; cancel, previews, prompts and save are quick calls."""
    host = app.host
    run_outputs = [
        c.status,
        c.curve,
        c.protect_btn,
        c.test_btn,
        c.cancel_btn,
        c.filename,
        c.grid,
        c.losses,
        c.summary,
    ]
    prompt_names = ("instance_prompt", "class_prompt", "identifier")
    attack_prompt_inputs = [c.attack_inputs[c.names_a.index(n)] for n in prompt_names]

    def stream(events):
        def run(*values):
            for view in events(*values):
                yield _updates(gr, view)

        return run

    def on_cancel():
        app.cancel()
        return _updates(gr, app.view())[0]

    def on_inspect(files_value, folder_value):
        items, notes = app.inspect_images(files_value, folder_value)
        return gr.update(value=items), gr.update(value=notes)

    def on_prompts(instance_prompt, class_prompt):
        values = attack_prompts(instance_prompt, class_prompt)
        return [gr.update(value=values[n]) if n in values else gr.update() for n in prompt_names]

    def on_save(name):
        message = app.save(name)
        refreshed = host.model_choices() if c.refresh is not None else None
        return gr.update(value=message), (
            gr.update(choices=refreshed) if refreshed is not None else gr.update()
        )

    photos = [c.model, c.files, c.folder, c.instance, c.klass]
    streaming = {"outputs": run_outputs, "show_progress": "hidden", **_event_options(gr)}
    c.protect_btn.click(
        stream(app.protect_events), inputs=[*photos, *c.advanced, c.more_subjects, c.original], **streaming
    )
    c.test_btn.click(stream(app.test_events), inputs=[c.kind, *c.attack_inputs, *c.eval_inputs], **streaming)
    c.images_btn.click(
        stream(app.protect_images_events),
        inputs=[*photos, c.image_method, c.image_budget, c.image_steps],
        **streaming,
    )
    cancel = c.cancel_btn.click(on_cancel, inputs=None, outputs=c.status, queue=False)
    cancel.then(stream(app.follow), inputs=None, **streaming)  # a reloaded page sees the stop too
    blocks.load(stream(app.follow), inputs=None, **streaming)  # a (re)loaded page follows a running job
    c.preset.change(
        lambda p: [gr.update(value=v) for v in app.preset_values(p)], inputs=c.preset, outputs=c.advanced
    )
    for box in (c.instance, c.klass):  # the attacker personalizes the same subject, with the same words
        box.change(on_prompts, inputs=[c.instance, c.klass], outputs=attack_prompt_inputs)
    for event in (c.files.change, c.folder.submit, c.folder.blur):
        event(on_inspect, inputs=[c.files, c.folder], outputs=[c.gallery, c.image_notes])
    blocks.load(on_inspect, inputs=[c.files, c.folder], outputs=[c.gallery, c.image_notes])
    c.save_btn.click(on_save, inputs=c.filename, outputs=[c.saved, c.model])
    if c.refresh is not None:
        c.refresh.click(lambda: gr.update(choices=host.refresh_models()), inputs=None, outputs=c.model)


# ------------------------------------------------------------------------------------------
# the standalone app: `apdm ui`
# ------------------------------------------------------------------------------------------
