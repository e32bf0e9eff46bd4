"""Load the package the way ComfyUI does, against the fakes in tests/fakes/comfyui, and run nodes like its executor.

``ComfyHost`` validates inputs as ComfyUI's ``validate_inputs`` does (required inputs present,
combo values in their list, numbers within min/max), calls ``IS_CHANGED``, and executes the
node function under ``torch.inference_mode()`` as ComfyUI's executor does. Its progress hook
mirrors ``main.hijack_progress``: it raises ``InterruptProcessingException`` once the interrupt
flag is set and forwards every update as a "progress" message.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FAKES = Path(__file__).resolve().parent / "fakes" / "comfyui"
FAKE_MODULES = ("comfy", "folder_paths", "server")


class ComfyHost:
    def __init__(self, base: Path) -> None:
        self._path0 = list(sys.path)
        # modules of these names that are not the fakes (e.g. pytest imported a checkout folder
        # named "comfy" as a package) step aside while the host is open
        self._shadowed = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in FAKE_MODULES}
        self._modules0 = set(sys.modules)
        sys.path.insert(0, str(FAKES))
        import comfy.model_management as mm
        import comfy.utils
        import folder_paths
        import server

        folder_paths.set_base(base)
        self.mm, self.utils, self.folder_paths = mm, comfy.utils, folder_paths
        self.server = server.PromptServer()
        self.on_progress = None  # optional test hook: called with (value, total, node_id) before the real one
        comfy.utils.set_progress_bar_global_hook(self._hook)
        self.name = str(ROOT).replace(".", "_x_")  # ComfyUI's sys.modules name for a custom-node folder
        spec = importlib.util.spec_from_file_location(self.name, ROOT / "__init__.py")
        self.package = importlib.util.module_from_spec(spec)
        sys.modules[self.name] = self.package
        spec.loader.exec_module(self.package)
        self.nodes = self.package.NODE_CLASS_MAPPINGS
        self.ui = {}  # node id -> the "ui" part of an output node's last result

    def _hook(self, value, total, preview, prompt_id=None, node_id=None):
        if self.on_progress is not None:
            self.on_progress(value, total, node_id)
        self.mm.throw_exception_if_processing_interrupted()
        self.server.send_sync(
            "progress", {"value": value, "max": total, "node": node_id}, self.server.client_id
        )
        if preview is not None:  # as ComfyUI's hook: the preview image goes to the queuing client
            self.server.send_sync("preview", preview, self.server.client_id)

    def close(self) -> None:
        self.utils.set_progress_bar_global_hook(None)
        self.mm.interrupt_current_processing(False)
        for name in set(sys.modules) - self._modules0:
            if name.split(".")[0] in FAKE_MODULES or name.startswith(self.name):
                del sys.modules[name]
        sys.modules.update(self._shadowed)
        sys.path[:] = self._path0

    # --- the executor ----------------------------------------------------------------------
    def messages(self, event: str) -> list[dict]:
        return [data for ev, data, _sid in self.server.messages if ev == event]

    def run(self, node_id: str, unique_id: str = "1", **inputs):
        cls = self.nodes[node_id]
        spec = cls.INPUT_TYPES()
        validate(spec, inputs)
        if hasattr(cls, "IS_CHANGED"):
            constants = {k: v for k, v in inputs.items() if not isinstance(spec_of(spec, k)[0], str) or
                         spec_of(spec, k)[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")}  # fmt: skip
            cls.IS_CHANGED(**constants)
        if "unique_id" in spec.get("hidden", {}):
            inputs["unique_id"] = unique_id
        with torch.inference_mode():
            out = getattr(cls(), cls.FUNCTION)(**inputs)
        if isinstance(out, dict):  # {"ui": ..., "result": (...)}, as output nodes may return
            self.ui[node_id] = out.get("ui")
            out = out["result"]
        assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES), (node_id, out)
        return out


def spec_of(spec: dict, name: str):
    for section in ("required", "optional"):
        if name in spec.get(section, {}):
            return spec[section][name]
    raise AssertionError(f"unknown input {name!r}")


def validate(spec: dict, inputs: dict) -> None:
    """What ComfyUI's execution.validate_inputs checks for widget values."""
    missing = [k for k in spec["required"] if k not in inputs]
    assert not missing, f"required inputs missing: {missing}"
    for name, value in inputs.items():
        kind, *rest = spec_of(spec, name)
        opts = rest[0] if rest else {}
        if isinstance(kind, list):
            assert value in kind, f"{name}={value!r} is not one of {kind}"
        elif kind in ("INT", "FLOAT"):
            assert opts.get("min", -float("inf")) <= value <= opts.get("max", float("inf")), (name, value)
        elif kind == "STRING":
            assert isinstance(value, str), (name, value)


def call_signature_matches(cls) -> list[str]:
    """Problems between INPUT_TYPES and the node function's parameters (empty when they agree)."""
    spec = cls.INPUT_TYPES()
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    problems = []
    for section in ("required", "optional", "hidden"):
        for name in spec.get(section, {}):
            if name not in params:
                problems.append(f"{section} input {name} is not a parameter")
            elif section != "required" and params[name].default is inspect.Parameter.empty:
                problems.append(f"{section} input {name} has no default")
    return problems
