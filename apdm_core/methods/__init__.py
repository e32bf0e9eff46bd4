"""Model-level protection methods: one module per method, one registry line each.

A method supplies what its protection optimises (the loss at the simulated attacker's weights
theta', an optional term at theta itself, the extra images it needs); the simulated-attacker
loop (``apdm_core.l2p.L2PTrainer``), state/resume, progress and export are shared by all.
Adding a method: a module with a ``ProtectionMethod`` subclass, and one line below.
"""

from __future__ import annotations

METHODS: dict[str, str] = {  # name -> "module:class", imported on first use
    "apdm": "apdm_core.methods.apdm:APDM",
    "persguard": "apdm_core.methods.persguard:PersGuard",
}


def get_method(name: str):
    """The method registered as ``name`` (an instance; methods hold no state of a run)."""
    import importlib

    from ..errors import InputError

    if name not in METHODS:
        raise InputError(f"Unknown protection method {name!r}; choose one of {', '.join(METHODS)}.")
    module, _, cls = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def __getattr__(name: str):  # the registry stays importable without torch (config.py reads it)
    if name == "ProtectionMethod":
        from .base import ProtectionMethod

        return ProtectionMethod
    raise AttributeError(name)


__all__ = ["METHODS", "ProtectionMethod", "get_method"]
