"""Model-level protection methods: one folder per method, one registry line each.

A method is a folder ``methods/<name>/`` (as peft's tuners) with ``settings.py``, its settings
dataclass (fields of ProtectConfig in the group ``<name>``, with their help texts; a ``check``
for them; no torch, so the config reads it at import), and ``loss.py``, its ``ProtectionMethod``
(the loss at the simulated attacker's weights theta', an optional term at theta, the extra images
it needs; imported on first use). The simulated-attacker loop (``apdm_core.l2p``), state/resume,
progress and export are shared by all. Adding a method: the folder, and one line below.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class MethodEntry:
    settings: str  # "module:class" of its settings dataclass
    method: str  # "module:class" of its ProtectionMethod
    title: str  # one line: the UI group's title, the method's line in help texts


METHODS: dict[str, MethodEntry] = {
    "apdm": MethodEntry(
        "apdm_core.methods.apdm.settings:APDMSettings",
        "apdm_core.methods.apdm.loss:APDM",
        "APDM: DPO + Learning to Protect (the paper)",
    ),
    "persguard": MethodEntry(
        "apdm_core.methods.persguard.settings:PersGuardSettings",
        "apdm_core.methods.persguard.loss:PersGuard",
        "PersGuard: a backdoor that fires after the attacker's fine-tuning",
    ),
}


def method_settings_classes() -> tuple[type, ...]:
    """The settings dataclass of every registered method (ProtectConfig inherits them all)."""
    from ..registry import load

    return tuple(load(entry.settings) for entry in METHODS.values())


def settings_fields(name: str) -> set[str]:
    """The names of the settings that the method ``name`` owns."""
    from ..registry import load

    return {f.name for f in fields(load(METHODS[name].settings))}


def inactive_settings(name: str) -> set[str]:
    """The settings of every method but ``name`` (they do not change a run of ``name``)."""
    own = settings_fields(name)
    return {f for other in METHODS if other != name for f in settings_fields(other)} - own


def get_method(name: str):
    """The method registered as ``name`` (an instance; methods hold no state of a run)."""
    from ..registry import resolve

    return resolve({k: e.method for k, e in METHODS.items()}, name, "protection method")()


def __getattr__(name: str):  # the registry stays importable without torch (config.py reads it)
    if name == "ProtectionMethod":
        from .base import ProtectionMethod

        return ProtectionMethod
    raise AttributeError(name)


__all__ = [
    "METHODS",
    "MethodEntry",
    "ProtectionMethod",
    "get_method",
    "inactive_settings",
    "method_settings_classes",
]
