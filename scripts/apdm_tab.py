"""AUTOMATIC1111 / Forge: the "Anti-Personalize" tab.

The page is apdm_core.ui's (the same Blocks as `apdm ui`); this file only tells it how A1111
works: its checkpoint list and folder, its GPU lock, its loaded model (moved off the GPU while
we train), and ``modules.shared.state`` for progress and Interrupt.
"""

import contextlib
import os
import sys
from pathlib import Path

from modules import script_callbacks

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # the engine lives beside scripts/; import it from this extension
    sys.path.insert(0, _ROOT)
    try:
        from apdm_core.ui import Host, ProtectApp, build_blocks
    finally:  # keep the extension's other top-level names (install, nodes) out of everyone's way
        sys.path.remove(_ROOT)
else:
    from apdm_core.ui import Host, ProtectApp, build_blocks

TAB_ID = "apdm_anti_personalize"


class A1111Host(Host):
    name = "a1111"
    keep_on_device = False  # the webui gets its GPU back after each run

    def __init__(self):
        from modules import paths, sd_models

        reports = os.path.join(paths.data_path, "outputs", "apdm-reports")
        super().__init__(output_dir=sd_models.model_path, report_dir=reports)  # models/Stable-diffusion

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
        from modules import call_queue, shared

        with call_queue.queue_lock:  # no generation runs on the GPU beside us
            shared.state.begin(job=f"apdm-{kind}")
            restore = _free_gpu()
            try:
                yield
            finally:
                restore()
                shared.state.end()
                shared.state.interrupted = False

    def progress(self, event):
        from modules import shared

        shared.state.job_count = event.total
        shared.state.job_no = event.step
        shared.state.textinfo = f"APDM {event.describe()}"

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


def on_ui_tabs():
    return [(build_blocks(ProtectApp(A1111Host())), "Anti-Personalize", TAB_ID)]


script_callbacks.on_ui_tabs(on_ui_tabs)
