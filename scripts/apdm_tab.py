"""AUTOMATIC1111 / Forge: the "Anti-Personalize" tab.

The page is apdm_core.ui's (the same Blocks as `apdm ui`); this file only tells it how A1111
works: its checkpoint list and folder (the page opens on the checkpoint the webui has loaded),
its GPU lock and task queue (a run is a task /internal/progress reports), its loaded model (moved
off the GPU while we train), ``modules.shared.state`` for progress, Interrupt and the live preview
(the loss curve every few steps), and a settings section (default preset, output folder, preview
interval) under Settings -> Anti-Personalize.
"""

import contextlib
import os
import sys
import uuid
from pathlib import Path

from modules import script_callbacks

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # the engine lives beside scripts/; import it from this extension
    sys.path.insert(0, _ROOT)
    try:
        from apdm_core.ui import BASIC_PRESETS, Host, LossCurves, ProtectApp, build_blocks, curve_image
    finally:  # keep the extension's other top-level names (install, nodes) out of everyone's way
        sys.path.remove(_ROOT)
else:
    from apdm_core.ui import BASIC_PRESETS, Host, LossCurves, ProtectApp, build_blocks, curve_image

TAB_ID = "apdm_anti_personalize"


class A1111Host(Host):
    name = "a1111"
    keep_on_device = False  # the webui gets its GPU back after each run

    def __init__(self):
        from modules import paths, sd_models, shared

        reports = os.path.join(paths.data_path, "outputs", "apdm-reports")
        output = _option("apdm_output_dir") or sd_models.model_path  # models/Stable-diffusion by default
        super().__init__(
            output_dir=output, report_dir=reports, preset=_option("apdm_default_preset") or "quick"
        )
        # the page opens on the checkpoint the webui has loaded, not the first of the list
        self.model = getattr(shared.opts, "sd_model_checkpoint", None) or ""
        self._curves, self._preview_at = LossCurves(), 0

    def model_choices(self):
        from modules import sd_models

        return sd_models.checkpoint_tiles()

    def refresh_models(self):
        from modules import sd_models

        sd_models.list_models()
        return self.model_choices()

    def resolve_model(self, value):
        from modules import sd_models

        info = sd_models.get_closet_checkpoint_match(value) if value else None
        return info.filename if info is not None else super().resolve_model(value)

    def output_path(self, filename):
        name = str(filename or "").strip()
        if Path(name).name != name:  # a shared webui: only names inside models/Stable-diffusion
            from apdm_core.errors import InputError

            raise InputError(f"{name!r}: give a file name without folders; it is saved in {self.output_dir}.")
        return super().output_path(name)

    def saved(self, path):
        from modules import sd_models

        sd_models.list_models()  # the new checkpoint appears in every checkpoint list

    @contextlib.contextmanager
    def session(self, kind):
        from modules import call_queue, progress, shared

        id_task = f"task(apdm-{kind}-{uuid.uuid4().hex[:8]})"
        progress.add_task_to_queue(id_task)  # the webui's queue and /internal/progress know the run
        with call_queue.queue_lock:  # no generation runs on the GPU beside us
            progress.start_task(id_task)
            shared.state.begin(job=f"apdm-{kind}")
            self._curves, self._preview_at = LossCurves(), 0
            restore = _free_gpu()
            try:
                yield
            finally:
                restore()
                shared.state.end()
                shared.state.interrupted = False
                progress.finish_task(id_task)

    def progress(self, event):
        from modules import shared

        shared.state.job_count = event.total
        shared.state.job_no = event.step
        shared.state.textinfo = f"APDM {event.describe()}"
        self._curves.add(event)
        every = int(_option("apdm_preview_every") or 0)
        # the live preview: the loss curve so far (a stage whose counter restarted starts counting again)
        if every and (event.step < self._preview_at or event.step - self._preview_at >= every):
            image = curve_image(self._curves.series)
            if image is not None:
                shared.state.assign_current_image(image)
                self._preview_at = event.step

    def should_stop(self):
        from modules import shared

        return bool(shared.state.interrupted)


def _free_gpu():
    """Move the webui's model off the GPU; returns what puts it back."""
    from modules import devices, sd_models

    try:  # Forge manages memory itself and reloads its models on the next generation
        from backend import memory_management

        memory_management.unload_all_models()
        memory_management.soft_empty_cache()
        return lambda: None
    except ImportError:
        pass
    model = sd_models.model_data.sd_model  # not shared.sd_model: that would load one
    if model is None or getattr(devices.device, "type", "cpu") == "cpu":
        return lambda: None
    sd_models.unload_model_weights(model)
    return lambda: sd_models.send_model_to_device(model)


SETTINGS = (  # key, default, label, component choices (None: a text box / number)
    ("apdm_default_preset", "quick", "Preset the tab opens with", BASIC_PRESETS),
    ("apdm_output_dir", "", "Folder the tab saves protected models to (empty: models/Stable-diffusion)", None),
    ("apdm_preview_every", 20, "Show the loss curve as the live preview every N steps (0 = never)", None),
)  # fmt: skip


def _option(key):
    from modules import shared

    return getattr(shared.opts, key, None)


def on_ui_settings():
    from modules import shared

    section = ("apdm", "Anti-Personalize")
    for key, default, label, choices in SETTINGS:
        if choices:
            import gradio as gr

            info = shared.OptionInfo(default, label, gr.Dropdown, {"choices": list(choices)}, section=section)
        else:
            info = shared.OptionInfo(default, label, section=section)
        shared.opts.add_option(key, info)


def on_ui_tabs():
    return [(build_blocks(ProtectApp(A1111Host())), "Anti-Personalize", TAB_ID)]


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_ui_tabs(on_ui_tabs)
