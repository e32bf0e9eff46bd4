"""The attacks by name: ``register_attack`` (a class decorator) fills it, ``AttackConfig`` checks
names against it. Below both ``base`` and ``config``, so neither imports the other to find an attack."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    from .base import Attack

_ATTACKS: dict[str, type[Attack]] = {}


def register_attack(name: str) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator: make an Attack subclass available as ``AttackConfig(kind=name)``."""

    def wrap(cls: type[Attack]) -> type[Attack]:
        cls.name = name
        _ATTACKS[name] = cls
        return cls

    return wrap


def registered_attacks() -> tuple[str, ...]:
    return tuple(_ATTACKS)


def get_attack(name: str) -> type[Attack]:
    if name not in _ATTACKS:
        raise InputError(f"Unknown attack {name!r}; choose one of {', '.join(_ATTACKS)}.")
    return _ATTACKS[name]
