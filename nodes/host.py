"""What the nodes need from ComfyUI, in one place: folders, device, memory, progress, images.

ComfyUI's modules (``comfy``, ``folder_paths``, ``server``) are imported inside the functions,
never at import time, so the package imports (and the tests run) without ComfyUI.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from apdm_core.data import IMAGE_EXTENSIONS
from apdm_core.errors import InputError
from apdm_core.progress import ProgressEvent

log = logging.getLogger("apdm.comfyui")

DEMO_MODEL = "[demo] APDM demo model (built in)"
DEMO_SUBJECT = "[demo] APDM demo subject (built in)"
DIFFUSERS_PREFIX = "[diffusers] "
PROGRESS_EVENT = "apdm.progress"  # the web extension (web/js/apdm.js) listens for it
EVENT_INTERVAL_S = 0.25  # at most this often a progress message goes to the browser
PREVIEW_INTERVAL_S = 5.0  # at most this often the node's preview image (the loss curve) is redrawn
PREVIEW_SIZE = 256  # px, the square previews of subject photos


# --- models and folders -----------------------------------------------------------------------
def diffusers_folders() -> dict[str, Path]:
    """Diffusers model folders (with model_index.json) under ComfyUI's models/diffusers, by name."""
    import folder_paths

    found: dict[str, Path] = {}
    for root in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(root):
            continue
        for dirpath, dirs, files in os.walk(root, followlinks=True):
            if "model_index.json" in files:
                name = os.path.relpath(dirpath, root).replace(os.sep, "/")
                found.setdefault(DIFFUSERS_PREFIX + name, Path(dirpath))
                dirs[:] = []  # a model's unet/, vae/ ... hold no further models
    return found


def model_choices() -> list[str]:
    import folder_paths

    return [DEMO_MODEL, *sorted(diffusers_folders()), *folder_paths.get_filename_list("checkpoints")]


def model_path(name: str) -> Path:
    """The file or folder behind an entry of ``model_choices()``."""
    import folder_paths

    folders = diffusers_folders()
    if name in folders:
        return folders[name]
    path = folder_paths.get_full_path("checkpoints", name)
    if path is None:
        raise InputError(
            f"Model {name!r} not found in ComfyUI's models/checkpoints or models/diffusers; "
            "put the checkpoint there and refresh (press R) or pick another."
        )
    return Path(path)


def load_model(name: str, model_type: str = "auto"):
    """Load an entry of ``model_choices()`` as an apdm_core SDModel (full precision, CPU).

    Loaded outside inference mode: ComfyUI runs nodes under ``torch.inference_mode()``, and
    inference tensors could not be trained later.
    """
    from apdm_core.loading import load_model as load

    with torch.inference_mode(False):
        if name == DEMO_MODEL:
            return demo_model()
        return load(model_path(name), model_type=None if model_type == "auto" else model_type)


def load_graph_model(model, clip, vae, model_type: str = "auto", title: str = "ComfyUI model"):
    """ComfyUI's MODEL/CLIP/VAE as an apdm_core SDModel (full precision, CPU, its own copy; outside
    inference mode like ``load_model``); ComfyUI's copies are unloaded from the device afterwards."""
    from apdm_core.checkpoint import load_checkpoint

    from .comfy_model import graph_checkpoint

    with torch.inference_mode(False):
        ckpt = graph_checkpoint(model, clip, vae, title)
        free_comfy_memory()
        return load_checkpoint(ckpt, model_type=None if model_type == "auto" else model_type)


def demo_model():
    """The built-in demo model: the pretrained demo-world model that ``apdm demo`` protects."""
    from apdm_core.world import load_world_model

    return load_world_model()


def demo_subject() -> list[Image.Image]:
    """The built-in demo subject's photos (the world subject of ``apdm demo``)."""
    from apdm_core.demo import DEMO_SUBJECT
    from apdm_core.world import render

    return render.photos(render.make_subject(DEMO_SUBJECT), 4)


def subject_folders() -> list[str]:
    """Sub-folders of ComfyUI's input folder that hold at least one image (relative, '/'-separated)."""
    import folder_paths

    root = folder_paths.get_input_directory()
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if dirpath != root and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            found.append(os.path.relpath(dirpath, root).replace(os.sep, "/"))
    return sorted(found)


def subject_folder(name: str) -> Path:
    """The input sub-folder ``name``, refusing names that leave ComfyUI's input folder."""
    import folder_paths

    from apdm_core.fileio import child_path

    path = child_path(folder_paths.get_input_directory(), name)
    if not path.is_dir():
        raise InputError(
            f"{path} is not a folder; put the subject photos in a folder under ComfyUI's input folder."
        )
    return path


def folder_signature(folder: Path) -> str:
    """Changes when an image in ``folder`` is added, removed, renamed or rewritten (for IS_CHANGED)."""
    h = hashlib.sha256()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
            st = entry.stat()
            h.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def save_path(model, filename: str) -> Path:
    """Where Save Protected Checkpoint writes: models/checkpoints/<name>.safetensors for a model loaded
    from a single file or the graph's MODEL/CLIP/VAE (export keeps its layout), else a diffusers folder
    models/diffusers/<name>."""
    import folder_paths

    from apdm_core.fileio import child_path

    single = (model.source and Path(model.source).is_file()) or model.info.get("format") == "memory"
    if single:  # a single file, or the graph's MODEL/CLIP/VAE (written as Save Checkpoint would)
        return child_path(folder_paths.get_folder_paths("checkpoints")[0], filename, ".safetensors")
    name = filename.strip()
    name = name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name
    return child_path(folder_paths.get_folder_paths("diffusers")[0], name)


# --- settings ---------------------------------------------------------------------------------
HOST_OWNED = {
    "model": "connect a Load Model node",
    "images": "connect a Load Subject Images node",
    "output": "use Save Protected Checkpoint",
}


def parse_settings(text: str) -> dict:
    """The optional settings box of a node: ProtectConfig fields as YAML, 'a: 1, b: x' on one line too."""
    import yaml

    text = (text or "").strip()
    if not text:
        return {}
    if "\n" not in text and not text.startswith(("{", "[")):
        text = "{" + text + "}"  # one line of 'field: value' pairs is a YAML flow mapping
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(
            f"The advanced settings are not valid YAML ({exc}); write one 'field: value' per line."
        ) from exc
    if not isinstance(data, dict):
        raise InputError(
            "The advanced settings must be 'field: value' pairs, e.g. 'mixed_precision: bf16, prior_weight: 0.5'."
        )
    for key, fix in HOST_OWNED.items():
        if key in data:
            raise InputError(f"'{key}' cannot be set in the advanced settings: {fix}.")
    from apdm_core.config import untrusted_settings

    return untrusted_settings(data, "the advanced settings")  # a shared workflow names no path


def protect_config(pairs, model, widgets: dict, advanced: str = "", original=None):
    """The run's ProtectConfig: the pairs' generation settings, the node's widgets, then the YAML box.
    ``original``: the original model of a protected ``model`` (the pairs come from it)."""
    from apdm_core.config import ProtectConfig

    if pairs.model_fingerprint != (original or model).fingerprint():
        if original is not None:
            raise InputError(
                "The pairs were generated with another model: with original_model connected, connect the "
                "original model to Generate Pairs too."
            )
        raise InputError(
            "The pairs were generated with another model: connect the same Load Model output to "
            "Generate Pairs and Protect Model."
        )
    from apdm_core.config import LEVER_CLASHES, PRESETS

    choice = widgets.pop("preset", "none")
    preset = performance_preset(choice, xl=model.is_xl)
    levers = dict(PRESETS.get(preset, {}))
    extra = parse_settings(advanced)
    values = {**pairs.config.to_dict(), **levers, **widgets, "device": device(), **extra}
    if choice == "auto":  # never pick levers the run's own settings cannot run with
        for lever, clash, _why in LEVER_CLASHES:
            if values.get(lever) and values.get(clash, 0) > 0 and lever not in extra:
                values[lever] = False
                log.warning(
                    "APDM: preset auto (%s) without %s: the run's %s needs it off.", preset, lever, clash
                )
    return ProtectConfig.from_dict(values)


def test_configs(widgets: dict, advanced: str = ""):
    """(AttackConfig, EvalConfig) of Test Personalization: the widgets, then the settings box.

    The attacker's identifier defaults to the word of the instance prompt that the class
    prompt lacks ('sks' for 'a photo of sks dog' / 'a photo of dog').
    """
    from dataclasses import fields

    from apdm_core.attack import AttackConfig
    from apdm_core.evaluate import EvalConfig

    extra = parse_settings(advanced)
    attack_keys = {f.name for f in fields(AttackConfig)}
    eval_keys = {f.name for f in fields(EvalConfig)}
    unknown = sorted(set(extra) - attack_keys - eval_keys)
    if unknown:
        raise InputError(
            f"Unknown setting(s) {', '.join(unknown)}: use fields of AttackConfig or EvalConfig "
            "(`apdm compare --help` lists them)."
        )
    values = {**widgets, "device": device(), **extra}
    new_words = [w for w in values["instance_prompt"].split() if w not in values["class_prompt"].split()]
    if "identifier" not in extra and len(new_words) == 1:
        values["identifier"] = new_words[0]
    attack = AttackConfig.from_dict({k: v for k, v in values.items() if k in attack_keys})
    return attack, EvalConfig.from_dict({k: v for k, v in values.items() if k in eval_keys})


def report_folder(base, protected, subject, attack, evaluation) -> Path:
    """output/apdm_reports/<attack>-<id>: one folder per distinct test (same inputs, same folder)."""
    import folder_paths

    from apdm_core.evaluate.core import load_references
    from apdm_core.evaluate.report import compare_identity
    from apdm_core.fileio import child_path

    refs = load_references(subject, base.native_resolution)
    identity = compare_identity(base, protected, refs, attack, evaluation)
    return child_path(folder_paths.get_output_directory(), f"apdm_reports/{attack.kind}-{identity[:12]}")


def report_outputs(folder: Path) -> tuple[torch.Tensor, str]:
    """(grid.png as IMAGE, summary.md) of a report folder written by apdm_core.evaluate.compare."""
    with Image.open(folder / "grid.png") as grid:
        image = to_image_batch([grid.convert("RGB")])
    summary = (folder / "summary.md").read_text(encoding="utf-8")
    return image, f"{summary.rstrip()}\n\nReport: {folder}"


# --- device and memory ------------------------------------------------------------------------
def device() -> str:
    """ComfyUI's torch device as an apdm_core device string."""
    import comfy.model_management as mm

    return str(mm.get_torch_device())


PERFORMANCE_PRESETS = ("auto", "none", "fast", "low-memory", "low-memory-8bit", "sdxl-24gb")


def performance_preset(choice: str, xl: bool = False) -> str:
    """The performance preset Protect Model runs with: the node's choice, or for 'auto' one that fits this
    GPU's memory (the README's estimates; SD1.5 at 512 px: the fast preset about 31 GB, low-memory 15,
    low-memory-8bit 10 with bitsandbytes; SDXL at 1024 px: low-memory 45, low-memory-8bit 30,
    sdxl-24gb 21, which also narrows the simulated attacker); 'none' on a CPU or when nothing is chosen."""
    if choice != "auto":
        return choice
    import comfy.model_management as mm

    dev = mm.get_torch_device()
    if getattr(dev, "type", str(dev)) != "cuda":
        return "none"
    total_gb = mm.get_total_memory(dev) / 2**30
    if xl:
        if total_gb >= 120:
            return "fast"
        if total_gb >= 48:
            return "low-memory"
        return "low-memory-8bit" if total_gb >= 32 else "sdxl-24gb"
    if total_gb >= 40:
        return "fast"
    if total_gb >= 16:
        return "low-memory"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "low-memory"
    return "low-memory-8bit"


def free_comfy_memory() -> None:
    """Unload ComfyUI's own models from the device before a long training run."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()


def offload(*models) -> None:
    """Move APDM models back to the CPU after a node ran (ComfyUI's memory manager does not see them)."""
    import comfy.model_management as mm

    for m in models:
        m.to("cpu")
    mm.soft_empty_cache()


# --- progress and interrupt -------------------------------------------------------------------
class NodeProgress:
    """apdm_core progress callback for one node: ComfyUI's progress bar + live events for web/js.

    ``comfy.utils.ProgressBar.update_absolute`` goes through ComfyUI's hook, which raises
    ``InterruptProcessingException`` when the user pressed Cancel; the engine saves its
    resumable state on any exception from the callback and re-raises it. Loss points are
    batched and sent at most every ``EVENT_INTERVAL_S`` seconds (every point arrives).
    """

    def __init__(self, node_id: str | None) -> None:
        import comfy.utils

        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(1, node_id=node_id)
        self.points: list[list[float | None]] = []
        self.last_sent = 0.0
        from apdm_core.ui.view import LossCurves

        self.curves = LossCurves()  # the losses so far, drawn as the node's preview image
        self.last_preview = 0.0

    def __call__(self, event: ProgressEvent) -> None:
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()  # also when no progress hook is installed
        if event.stage == "protect":
            self.points.append([event.step, event.losses.get("protect"), event.losses.get("per")])
        now = time.monotonic()
        if now - self.last_sent >= EVENT_INTERVAL_S or event.step >= event.total:
            self.send(event)
            self.last_sent = now
        self.curves.add(event)
        self.bar.update_absolute(event.step, event.total, self.preview(now, event.step >= event.total))

    def preview(self, now: float, last: bool):
        """The loss curve so far as ComfyUI's preview image of the node (its ProgressBar preview, which the
        server sends to the queuing client), at most every PREVIEW_INTERVAL_S seconds; None in between."""
        if not self.curves.series or (now - self.last_preview < PREVIEW_INTERVAL_S and not last):
            return None
        from apdm_core.ui.view import curve_image

        image = curve_image(self.curves.series)
        self.last_preview = now
        return ("PNG", image, 512) if image is not None else None

    def send(self, event: ProgressEvent) -> None:
        try:
            from server import PromptServer
        except ImportError:  # ComfyUI without its server (scripts): the bar is enough
            return
        payload = {
            "node": self.node_id,
            "stage": event.stage,
            "step": event.step,
            "total": event.total,
            "outer": event.outer,
            "inner": event.inner,
            "losses": event.losses,
            "eta_s": event.eta_s,
            "elapsed_s": event.elapsed_s,
            "text": event.describe(),
            "points": self.points,
        }
        self.points = []
        # to the client that queued the prompt (ComfyUI sets client_id per run)
        server = PromptServer.instance
        server.send_sync(PROGRESS_EVENT, payload, getattr(server, "client_id", None))


# --- images -----------------------------------------------------------------------------------
def to_image_batch(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> ComfyUI IMAGE (B, H, W, 3) float in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr)


def from_image_batch(batch: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE (B, H, W, C) -> PIL RGB images."""
    arr = (batch.detach().float().clamp(0, 1)[..., :3] * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
