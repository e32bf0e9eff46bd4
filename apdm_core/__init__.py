"""APDM engine: protect a diffusion model against unauthorized personalization.

Imports no host module (ComfyUI, A1111). Heavy submodules load lazily so that
``import apdm_core`` stays cheap for hosts that only register UI.
"""

from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"


class _TorchvisionFallbackNotice(logging.Filter):
    """Drop transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to
    ...Pil" notices: diffusers' pipeline imports trigger them, the engine never uses those image
    processors, and there is no CPU torchvision for the pinned torch, so a user can do nothing about
    them. Every other transformers message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())

_LAZY = {
    "ProtectConfig": "config",
    "PRESETS": "config",
    "protect": "protection",
    "ProtectResult": "protection",
    "load_model": "loading",
    "ImageProtectConfig": "images",
    "protect_images": "images",
    "SDModel": "models",
    "ProgressEvent": "progress",
    "APDMError": "errors",
    "InputError": "errors",
    "TrainingDiverged": "errors",
    "Cancelled": "errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'apdm_core' has no attribute {name!r}")
