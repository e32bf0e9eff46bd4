"""The subjects a run protects: one in the primary place (images, instance_prompt, class_prompt) and any
number more in ``ProtectConfig.subjects``; the identifier of each, and the checks of the list."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

SUBJECT_KEYS = ("images", "instance_prompt", "class_prompt", "class_images")


def identifier_word(instance_prompt: str, class_prompt: str) -> str | None:
    """The identifier: the first word of the instance prompt that the class prompt lacks ('sks' in
    'a photo of sks person' / 'a photo of person'); None when there is none."""
    class_words = set(str(class_prompt).split())
    return next((w for w in str(instance_prompt).split() if w not in class_words), None)


@dataclass(frozen=True)
class Subject:
    """One subject a run protects: its photos, the prompt an attacker would use, its class prompt."""

    images: tuple  # folders, files (or, from a host, PIL images)
    instance_prompt: str
    class_prompt: str
    class_images: str = ""

    @property
    def identifier(self) -> str | None:
        return identifier_word(self.instance_prompt, self.class_prompt)


def check_subjects(subjects: list, all_subjects) -> None:
    """Every entry of ``subjects`` is a mapping with photos and both prompts; no two subjects (with the
    primary one, from ``all_subjects()``) share an identifier. InputError naming the subject and the fix."""
    for i, s in enumerate(subjects, 2):
        if not isinstance(s, dict):
            raise InputError(
                f"ProtectConfig.subjects entry {i - 1} must be a mapping with images, instance_prompt and "
                f"class_prompt (got {s!r})."
            )
        unknown = sorted(set(s) - set(SUBJECT_KEYS))
        if unknown:
            raise InputError(
                f"Subject {i}: unknown key(s) {', '.join(unknown)}; use {', '.join(SUBJECT_KEYS)}."
            )
        if not s.get("images"):
            raise InputError(f"Subject {i} has no photos: give its images (a folder or files).")
        for key in ("instance_prompt", "class_prompt"):
            if not str(s.get(key, "")).strip():
                raise InputError(
                    f"Subject {i} has no {key} (e.g. instance_prompt: 'a photo of zwx dog', class_prompt: "
                    "'a photo of dog')."
                )
    if subjects:
        seen: dict[str, int] = {}
        for i, s in enumerate(all_subjects(), 1):
            ident = s.identifier
            if ident is None:
                raise InputError(
                    f"Subject {i}: the instance prompt {s.instance_prompt!r} has no word the class prompt "
                    f"{s.class_prompt!r} lacks (the identifier, e.g. 'sks')."
                )
            if ident in seen:
                raise InputError(
                    f"Subjects {seen[ident]} and {i} use the same identifier {ident!r}; give each subject its "
                    "own word (e.g. sks, zwx, qkv)."
                )
            seen[ident] = i
