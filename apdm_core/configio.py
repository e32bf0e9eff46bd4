"""The machinery every settings dataclass shares: field metadata, type coercion, range checks and a
JSON/YAML round trip (ProtectConfig, AttackConfig, EvalConfig, ImageProtectConfig, method settings)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import field, fields
from pathlib import Path
from typing import Any

from .errors import InputError


def config_field(cls, name: str) -> dataclasses.Field:
    """The dataclass field ``name`` of the config class ``cls``."""
    return next(f for f in fields(cls) if f.name == name)


def field_default(cls, name: str) -> Any:
    f = config_field(cls, name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def field_help(cls, name: str) -> str:
    """The help text of a setting (CLI help, tooltips of the page and the ComfyUI widgets)."""
    return config_field(cls, name).metadata["help"]


def _f(default: Any, help: str, choices: tuple | None = None, group: str = "advanced", **kw) -> Any:
    meta = {"help": help, "choices": choices, "group": group}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


_TYPE_WORDS = {int: "a whole number", float: "a number", str: "text"}


def _coerce(value: Any, typ: type) -> Any:
    """``value`` as ``typ`` (int, float, str, Path-like); TypeError/ValueError when it is not one."""
    if isinstance(value, bool) and typ is not bool:
        raise TypeError(value)
    if typ is int:
        if isinstance(value, str):
            value = float(value.strip()) if value.strip().lower() not in ("inf", "nan") else None
        if isinstance(value, float):
            if value is None or not value.is_integer():
                raise ValueError(value)
            return int(value)
        if not isinstance(value, int):
            raise TypeError(value)
        return value
    if typ is float:
        if isinstance(value, str):
            return float(value.strip())
        if not isinstance(value, (int, float)):
            raise TypeError(value)
        return float(value)
    if typ is str:
        if isinstance(value, (int, float, Path)):
            return str(value)
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    return value


def _example(f) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return repr(default) if not isinstance(default, str) else (default or "...")


class ConfigIO:
    """Shared by the config dataclasses: types, choices check, dict/JSON/YAML round trip, save/load."""

    def coerce_types(self) -> None:
        """Bring every field to its declared type or raise InputError naming the field and the value.

        A YAML file reads ``5e-6`` as a string and a hand-written config may hold ``2.5`` for a
        step count: numbers in strings become numbers, integral floats become ints, anything
        else that does not fit (``outer_steps: 2.5``, ``seed: 1.7``, ``lr: fast``) is refused.
        """
        import typing

        hints = typing.get_type_hints(type(self))
        name = type(self).__name__
        for f in fields(self):
            value, typ = getattr(self, f.name), hints[f.name]
            args = typing.get_args(typ)
            if value is None and type(None) in args:
                continue
            base = (
                next((a for a in args if a is not type(None)), typ)
                if args and typing.get_origin(typ) is not list
                else typ
            )
            try:
                if typing.get_origin(base) is list:
                    item = typing.get_args(base)[0]
                    if isinstance(value, (str, Path)):
                        value = [value]
                    if not isinstance(value, (list, tuple)):
                        raise TypeError
                    value = [_coerce(v, item) for v in value]
                elif base in (int, float, str):
                    value = _coerce(value, base)
            except (TypeError, ValueError):
                raise InputError(
                    f"{name}.{f.name}={value!r} is not {_TYPE_WORDS.get(base, str(base))}; "
                    f"e.g. {f.name}: {_example(f)}."
                ) from None
            setattr(self, f.name, value)

    def normalize_images(self) -> None:
        """``images`` as a list of path strings (one path, or none for an empty one, becomes a list)."""
        if isinstance(self.images, (str, Path)):
            self.images = [str(self.images)] if str(self.images) else []
        self.images = [str(p) for p in self.images]

    def check_choices(self) -> None:
        """Raise InputError for a field whose value is not one of its ``choices`` metadata."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise InputError(
                    f"{type(self).__name__}.{f.name}={value!r} is not valid; choose one of {', '.join(choices)}."
                )

    def check_bools(self) -> None:
        """Raise InputError for a bool field holding anything but True/False (e.g. "no" from a file)."""
        for f in fields(self):
            if f.type in (bool, "bool") and not isinstance(getattr(self, f.name), bool):
                raise InputError(
                    f"{type(self).__name__}.{f.name} must be true or false (got {getattr(self, f.name)!r})."
                )

    def check_ranges(
        self,
        at_least_one: tuple = (),
        non_negative_int: tuple = (),
        positive: tuple = (),
        non_negative: tuple = (),
        unit_interval: tuple = (),
    ) -> None:
        """Raise InputError for the first named field out of its range (None values are not checked)."""
        checks = (
            (at_least_one, lambda v: int(v) >= 1, "must be >= 1"),
            (non_negative_int, lambda v: int(v) >= 0, "must be >= 0"),
            (positive, lambda v: float(v) > 0 and math.isfinite(float(v)), "must be a positive number"),
            (non_negative, lambda v: float(v) >= 0 and math.isfinite(float(v)), "must be >= 0"),
            (unit_interval, lambda v: 0 <= float(v) < 1, "must be in [0, 1)"),
        )
        for names, ok, rule in checks:
            for name in names:
                value = getattr(self, name)
                if value is not None and not ok(value):
                    raise InputError(f"{type(self).__name__}.{name} {rule} (got {value}).")

    def check_resolution_and_prompts(self) -> None:
        """For configs with ``resolution``, ``instance_prompt`` and ``class_prompt`` fields."""
        if self.resolution and self.resolution % 8:
            raise InputError(
                f"{type(self).__name__}.resolution={self.resolution} must be a multiple of 8 (the VAE downsamples by 8)."
            )
        if not self.instance_prompt.strip() or not self.class_prompt.strip():
            raise InputError(
                "instance_prompt and class_prompt must not be empty (e.g. 'a photo of sks person' / 'a photo of person')."
            )

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                f"Unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}."
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        from .fileio import atomic_write_text

        path = Path(path)
        text = self.to_yaml() if path.suffix.lower() in (".yaml", ".yml") else self.to_json()
        return atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"Cannot read config {path}: {exc.strerror}.") from exc
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
            raise InputError(
                f"{path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {exc}"
            ) from exc
        if not isinstance(data, dict):
            raise InputError(f"{path} must contain a mapping of {cls.__name__} fields.")
        return cls.from_dict(data)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)
