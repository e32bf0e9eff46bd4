"""One lazy registry lookup: "module:attribute" strings imported on first use (methods, image methods)."""

from __future__ import annotations

import importlib

from .errors import InputError


def resolve(registry: dict, name: str, what: str):
    """The object the registry entry ``name`` names ("module:attribute"), imported now."""
    if name not in registry:
        raise InputError(f"Unknown {what} {name!r}; choose one of {', '.join(registry)}.")
    return load(registry[name])


def load(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)
