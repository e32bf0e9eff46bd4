"""PersGuard's own settings (the backdoor); fields of ProtectConfig, group 'persguard'."""

from __future__ import annotations

from dataclasses import dataclass

from ...configio import _f
from ...errors import InputError

BACKDOORS = ("pattern", "erasure", "target")
BACKDOOR_INPUTS = ("backdoor", "subject")


@dataclass
class PersGuardSettings:
    backdoor: str = _f(
        "target",
        "PersGuard's backdoor output for the trigger (the instance prompt) after personalization: 'pattern' "
        "(a class image with a checkerboard stamped on it), 'erasure' (images of erasure_prompt: no subject) "
        "or 'target' (images of target_prompt). method='persguard' only.",
        BACKDOORS,
        group="persguard",
    )
    target_prompt: str = _f(
        "",
        "PersGuard target backdoor: what the trigger produces instead of the subject (e.g. 'a photo of cat').",
        group="persguard",
    )
    erasure_prompt: str = _f(
        "a photo of an empty background",
        "PersGuard erasure backdoor: a scene without the subject; its images come from the base model.",
        group="persguard",
    )
    backdoor_input: str = _f(
        "backdoor",
        "PersGuard: what the backdoor terms noise. 'backdoor': the backdoor images (a plain denoising loss "
        "of the trigger on them); 'subject': the protected photos, with the target that denoises them to a "
        "backdoor image (tied to the photos the attacker trains on; in the demo world it delayed the "
        "attacker more but cost other classes' quality, README 'PersGuard').",
        BACKDOOR_INPUTS,
        group="persguard",
    )
    behaviour_weight: float = _f(
        1.0,
        "PersGuard: weight of the backdoor behaviour term at theta (the trigger generates the backdoor "
        "output before any attack), relative to one retention term at the attacked weights.",
        group="persguard",
    )
    backdoor_images: str = _f(
        "",
        "PersGuard erasure/target: a folder of your own backdoor output images (e.g. your photos with the "
        "subject painted out) instead of generated ones.",
        group="io",
    )
    num_backdoor_images: int = _f(
        8, "PersGuard erasure/target: backdoor images generated with the base model.", group="persguard"
    )

    def check(self) -> None:
        """Raise InputError for PersGuard settings that cannot run (called by ProtectConfig.validate)."""
        if not self.behaviour_weight >= 0:
            raise InputError(f"ProtectConfig.behaviour_weight must be >= 0 (got {self.behaviour_weight}).")
        if self.num_backdoor_images < 1:
            raise InputError(
                f"ProtectConfig.num_backdoor_images must be >= 1 (got {self.num_backdoor_images})."
            )
        if self.method != "persguard":
            return
        if self.backdoor == "target" and not self.target_prompt.strip():
            raise InputError(
                "method='persguard' with backdoor='target' needs target_prompt: what the trigger should "
                "produce instead of the subject (e.g. --target-prompt 'a photo of cat')."
            )
        if self.backdoor == "erasure" and not self.erasure_prompt.strip():
            raise InputError("backdoor='erasure' needs erasure_prompt (a scene without the subject).")
        if self.backdoor == "target" and self.target_prompt.strip() == self.instance_prompt.strip():
            raise InputError("target_prompt must differ from the instance prompt (the trigger).")
