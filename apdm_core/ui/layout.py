"""The Gradio Blocks: layout and wiring (Gradio imported only here and in ``cli.launch``)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ..config import ProtectConfig
from ..images.config import IMAGE_METHODS
from .app import ProtectApp
from .forms import (
    ADVANCED_FIELDS,
    GROUP_TITLES,
    TITLE,
    UI_CHOICES,
    _base_type,
    _field,
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
    """The whole page as a gr.Blocks (A1111 renders it in a tab; ``launch`` serves it alone)."""
    import gradio as gr

    from ..attack import AttackConfig, registered_attacks
    from ..evaluate.config import EvalConfig

    app = app or ProtectApp()
    host = app.host
    start, start_attack, start_eval = app.initial_values(), app.initial_attack(), app.initial_evaluation()
    names_a, names_e = attack_fields(), eval_fields()
    meta = {f.name: f.metadata for f in fields(ProtectConfig)}

    def updates(view: View) -> tuple:
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

    with gr.Blocks(analytics_enabled=False, title=f"APDM {TITLE}") as blocks:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                choices = host.model_choices()
                refresh = None
                if choices is None:
                    model = gr.Textbox(
                        label="Model", value=host.model, info=meta["model"]["help"], elem_id="apdm_model"
                    )
                else:
                    with gr.Row():
                        model = gr.Dropdown(
                            choices=choices,
                            label="Checkpoint",
                            elem_id="apdm_model",
                            value=host.model if host.model in choices else (choices[0] if choices else None),
                        )
                        refresh = gr.Button("Refresh list", elem_id="apdm_refresh_models")
                files = gr.File(
                    label="Subject images (4-6 photos)", file_count="multiple", file_types=["image"]
                )
                folder = gr.Textbox(
                    label="…or a folder of subject images (several paths: separate them with ;)",
                    value=host.images,
                    elem_id="apdm_folder",
                )
                gallery = gr.Gallery(
                    label="Subject images as they will be used", columns=6, height=240, elem_id="apdm_gallery"
                )
                image_notes = gr.Markdown(elem_id="apdm_image_notes")
                instance = gr.Textbox(
                    label="Instance prompt",
                    value=start["instance_prompt"],
                    info=meta["instance_prompt"]["help"],
                    elem_id="apdm_instance_prompt",
                )
                klass = gr.Textbox(
                    label="Class prompt",
                    value=start["class_prompt"],
                    info=meta["class_prompt"]["help"],
                    elem_id="apdm_class_prompt",
                )
                preset = gr.Radio(
                    choices=list(host.presets),
                    value=host.preset or None,  # none selected: the page opened on its own settings
                    label="Preset",
                    elem_id="apdm_preset",
                    info="quick: a first look (100 x 10 steps); paper: the paper's settings (800 x 20); "
                    "robust: the levers that held in the demo world (README, Protection that holds); "
                    "thorough: 1200 x 20. Fills the Advanced settings.",
                )
                with gr.Accordion("Advanced", open=False):
                    advanced = _field_group(gr, ProtectConfig, ADVANCED_FIELDS, start, "apdm_")
                with gr.Accordion("Protect the photos instead (image-level: ASPL / LDU)", open=False):
                    gr.Markdown(
                        "For photos you post where you do not control the model: a bounded perturbation of the "
                        "photos above (the model is the surrogate). Written as PNGs to a new folder under "
                        f"`{host.output_dir}/protected-photos`. README: Image-level protection."
                    )
                    with gr.Row():
                        image_method = gr.Dropdown(choices=list(IMAGE_METHODS), value="aspl", label="Method",
                                                   elem_id="apdm_image_method")  # fmt: skip
                        image_budget = gr.Slider(1, 32, value=8, step=1, label="Budget (/255)",
                                                 elem_id="apdm_image_budget")  # fmt: skip
                        image_steps = gr.Number(
                            value=50, precision=0, label="Iterations", elem_id="apdm_image_steps"
                        )
                    images_btn = gr.Button("Protect photos", elem_id="apdm_protect_images")
            with gr.Column():
                with gr.Row():
                    protect_btn = gr.Button("Protect", variant="primary", elem_id="apdm_protect")
                    cancel_btn = gr.Button("Cancel", interactive=False, elem_id="apdm_cancel")
                status = gr.HTML(app.view().status, elem_id="apdm_status")
                curve = gr.Image(label="Losses", type="pil", interactive=False, elem_id="apdm_curve")
                gr.Markdown(
                    "**Test personalization**: attack the original and the protected model the same "
                    "way and compare (report grid, loss curves, metrics)."
                )
                with gr.Row():
                    kind = gr.Dropdown(
                        choices=list(registered_attacks()),
                        value=start_attack["kind"],
                        label="Attack",
                        info=_field(AttackConfig, "kind").metadata["help"],
                        elem_id="apdm_attack_kind",
                    )
                    test_btn = gr.Button("Test personalization", elem_id="apdm_test")
                with gr.Accordion("Attack and evaluation settings", open=False):
                    attack_inputs = _field_group(gr, AttackConfig, names_a, start_attack, "apdm_attack_")
                    eval_inputs = _field_group(gr, EvalConfig, names_e, start_eval, "apdm_eval_")
                grid = gr.Image(
                    label="Samples after the attack", type="pil", interactive=False, elem_id="apdm_grid"
                )
                losses = gr.Image(label="Loss curves", type="pil", interactive=False, elem_id="apdm_losses")
                summary = gr.Markdown(elem_id="apdm_summary")
                gr.Markdown(f"**Save** (into `{host.output_dir}`; a `.safetensors` name writes one file)")
                with gr.Row():
                    filename = gr.Textbox(label="File name", elem_id="apdm_filename")
                    save_btn = gr.Button("Save", elem_id="apdm_save")
                saved = gr.Markdown(elem_id="apdm_saved")  # fmt: skip

        run_outputs = [status, curve, protect_btn, test_btn, cancel_btn, filename, grid, losses, summary]
        attack_prompt_inputs = [
            attack_inputs[names_a.index(n)] for n in ("instance_prompt", "class_prompt", "identifier")
        ]

        def stream(events):
            def run(*values):
                for view in events(*values):
                    yield updates(view)

            return run

        def on_cancel():
            app.cancel()
            return updates(app.view())[0]

        def on_inspect(files_value, folder_value):
            items, notes = app.inspect_images(files_value, folder_value)
            return gr.update(value=items), gr.update(value=notes)

        def on_prompts(instance_prompt, class_prompt):
            values = attack_prompts(instance_prompt, class_prompt)
            return [
                gr.update(value=values[n]) if n in values else gr.update()
                for n in ("instance_prompt", "class_prompt", "identifier")
            ]

        def on_save(name):
            message = app.save(name)
            refreshed = host.model_choices() if refresh is not None else None
            return gr.update(value=message), (
                gr.update(choices=refreshed) if refreshed is not None else gr.update()
            )

        streaming = {"outputs": run_outputs, "show_progress": "hidden", **_event_options(gr)}
        protect_btn.click(
            stream(app.protect_events), inputs=[model, files, folder, instance, klass, *advanced], **streaming
        )
        test_btn.click(stream(app.test_events), inputs=[kind, *attack_inputs, *eval_inputs], **streaming)
        images_btn.click(stream(app.protect_images_events),
                         inputs=[model, files, folder, instance, klass, image_method, image_budget, image_steps],
                         **streaming)  # fmt: skip
        cancel = cancel_btn.click(on_cancel, inputs=None, outputs=status, queue=False)
        cancel.then(stream(app.follow), inputs=None, **streaming)  # a reloaded page sees the stop too
        blocks.load(stream(app.follow), inputs=None, **streaming)  # a (re)loaded page follows a running job
        preset.change(
            lambda p: [gr.update(value=v) for v in app.preset_values(p)], inputs=preset, outputs=advanced
        )
        for box in (instance, klass):  # the attacker personalizes the same subject, with the same words
            box.change(on_prompts, inputs=[instance, klass], outputs=attack_prompt_inputs)
        for event in (files.change, folder.submit, folder.blur):
            event(on_inspect, inputs=[files, folder], outputs=[gallery, image_notes])
        blocks.load(on_inspect, inputs=[files, folder], outputs=[gallery, image_notes])
        save_btn.click(on_save, inputs=filename, outputs=[saved, model])
        if refresh is not None:
            refresh.click(lambda: gr.update(choices=host.refresh_models()), inputs=None, outputs=model)  # fmt: skip
    blocks.apdm_app = app  # for tests and hosts that want the event functions
    return blocks


# ------------------------------------------------------------------------------------------
# the standalone app: `apdm ui`
# ------------------------------------------------------------------------------------------
