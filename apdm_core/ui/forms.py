"""Page fields: which ProtectConfig/AttackConfig/EvalConfig fields the page shows, and text <-> value."""

from __future__ import annotations

import typing
from dataclasses import fields
from typing import Any

from ..config import MODEL_TYPES, PATH_FIELDS, ProtectConfig, identifier_word
from ..configio import field_default
from ..errors import InputError
from ..methods import METHODS

TITLE = "Anti-Personalize"
# Fields shown in the main panel; every other ProtectConfig field is in the Advanced accordion.
MAIN_FIELDS = ("model", "images", "instance_prompt", "class_prompt", "output")
# Fields that name files (PATH_FIELDS) are never on the page: a page served to a network must not
# read or write arbitrary paths. The cache and state files live in the host's default places.
ADVANCED_FIELDS = tuple(
    f.name for f in fields(ProtectConfig) if f.name not in MAIN_FIELDS and f.name not in PATH_FIELDS
)
# AttackConfig fields the page does not show: the models and images are the protection's, the
# report folder is the app's, the kind has its own dropdown; no file paths.
ATTACK_HIDDEN = ("kind", *PATH_FIELDS)
EVAL_HIDDEN = tuple(PATH_FIELDS)
UI_CHOICES = {"model_type": MODEL_TYPES}  # free text elsewhere (a config folder), a choice here
GROUP_TITLES = {
    "basic": "Main settings",
    "advanced": "Algorithm, optimizer, sampling",
    "io": "Files",
    "sampling": "Sampling",
    "metrics": "Metrics",
    "robust": "Robustness levers",
    "lora": "LoRA attack",
    "textual_inversion": "Textual inversion attack",
    **{name: f"{entry.title} (method {name})" for name, entry in METHODS.items()},
}
# the presets the pages offer (fast / low-memory: GPU presets)
BASIC_PRESETS = ("quick", "paper", "robust", "family", "thorough", "fast", "low-memory", "sdxl-24gb")


def _default(name: str, cls=ProtectConfig) -> Any:
    return field_default(cls, name)


def _base_type(cls, name: str) -> tuple[Any, bool]:
    """(the field's type without None, whether None is allowed)."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def form_value(cls, name: str, value: Any) -> Any:
    """A field's value as its page component shows it (lists as 'a, b', None as '')."""
    typ, _ = _base_type(cls, name)
    if typing.get_origin(typ) is list:
        return ", ".join(str(v) for v in value or [])
    return "" if value is None else value


def parse_field(cls, name: str, raw: Any) -> Any:
    """A component's value back as the field's type; InputError naming the setting when it is not one."""
    typ, optional = _base_type(cls, name)
    if typ is bool:
        return bool(raw)
    if typing.get_origin(typ) is list:
        item = typing.get_args(typ)[0]
        parts = raw if isinstance(raw, (list, tuple)) else str(raw or "").split(",")
        try:
            return [item(str(p).strip()) for p in parts if str(p).strip()]
        except ValueError as exc:
            raise InputError(
                f"Setting {name}={raw!r}: give {item.__name__} values separated by commas."
            ) from exc
    if raw is None or (isinstance(raw, str) and not raw.strip() and typ is not str):
        if optional:
            return None
        raise InputError(f"Setting {name} is empty; enter a value (default {_default(name, cls)!r}).")
    try:
        if typ is int:
            number = float(raw)
            if number != int(number):
                raise ValueError(raw)
            return int(number)
        return typ(raw) if typ in (float, str) else raw
    except (TypeError, ValueError) as exc:
        raise InputError(f"Setting {name}={raw!r} is not a valid {typ.__name__}.") from exc


def parse_fields(cls, names, raw_values) -> dict[str, Any]:
    return {name: parse_field(cls, name, raw) for name, raw in zip(names, raw_values)}


def attack_fields() -> tuple[str, ...]:
    from ..attack import AttackConfig

    return tuple(f.name for f in fields(AttackConfig) if f.name not in ATTACK_HIDDEN)


def eval_fields() -> tuple[str, ...]:
    from ..evaluate.config import EvalConfig

    return tuple(f.name for f in fields(EvalConfig) if f.name not in EVAL_HIDDEN)


def attack_prompts(instance_prompt: str, class_prompt: str) -> dict[str, str]:
    """The attacker's prompts following the protection's: the identifier is the instance prompt's
    first word that the class prompt lacks ('sks' in 'a photo of sks person' / 'a photo of person')."""
    values = {"instance_prompt": str(instance_prompt), "class_prompt": str(class_prompt)}
    identifier = identifier_word(instance_prompt, class_prompt)
    if identifier:
        values["identifier"] = identifier
    return values


def _path_of(item: Any) -> str:
    """A file path from whatever an upload component hands over (str, Path, tempfile, dict)."""
    if isinstance(item, dict):
        item = item.get("path") or item.get("name") or ""
    return str(getattr(item, "name", item) or "")


# ------------------------------------------------------------------------------------------
# hosts
# ------------------------------------------------------------------------------------------
