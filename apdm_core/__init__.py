"""APDM engine: protect a diffusion model against unauthorized personalization.

Imports no host module (ComfyUI, A1111). Heavy submodules load lazily so that
``import apdm_core`` stays cheap for hosts that only register UI.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ProtectConfig": "config",
    "PRESETS": "config",
    "protect": "protect",
    "ProtectResult": "protect",
    "load_model": "models",
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
