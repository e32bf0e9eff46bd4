"""The path rule: which settings name files or folders, and the check that settings typed into a
host's free-text box (a shared ComfyUI workflow, a page served to a network) name none of them."""

from __future__ import annotations

from typing import Any

from .errors import InputError

MODEL_TYPES = ("auto", "sd1", "sd2", "sd2-v")
# Settings that name files or folders (of every config class). They come only from a host's own
# widgets (a model dropdown, a folder of ComfyUI/input, the app's output folder), never from
# free-text settings a shared workflow or a web page can carry; see ``untrusted_settings``.
PATH_FIELDS = frozenset(
    {
        "model",
        "reference_model",
        "images",
        "output",
        "class_images",
        "cache_dir",
        "state_path",
        "dino_model",
        "clip_model",
        "backdoor_images",
        "subjects",
    }
)


def untrusted_settings(data: dict[str, Any], where: str = "these settings") -> dict[str, Any]:
    """``data`` (settings typed into a host's free-text box) when it names no file or folder.

    A ComfyUI workflow JSON shared by someone else, or a page served to a network, must not be
    able to make the tool read or write arbitrary paths: path fields are refused, and
    ``model_type`` may only be one of MODEL_TYPES (a config folder is a path).
    """
    bad = sorted(k for k in data if k in PATH_FIELDS)
    if bad:
        raise InputError(
            f"{', '.join(bad)} cannot be set in {where}: files and folders come only from the host's own "
            "inputs (model and image loaders, the output folder); the cache and state files live in the "
            "host's folders."
        )
    if "model_type" in data and data["model_type"] not in MODEL_TYPES:
        raise InputError(
            f"model_type={data['model_type']!r} in {where} must be one of {', '.join(MODEL_TYPES)} "
            "(a config folder can only be given on the command line or in Python)."
        )
    return data  # see apdm_core.checkpoint
