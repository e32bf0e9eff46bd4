"""AttackConfig: every setting of a personalization attack, validated, with a JSON/YAML round trip.

Independent of ProtectConfig on purpose: the attacker may use another learning rate, more
steps, another identifier, other images. ``None`` for ``steps``, ``lr`` and ``prior_weight``
means the chosen attack's own default (``resolved()`` fills them in): the paper's DreamBooth
attack is lr 5e-6, 800 steps, batch 1 + 1 class image, 200 class images, grad clip 1.0, random
crop; LoRA DreamBooth is lr 1e-4 with rank 4; Textual Inversion learns one new token embedding.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from typing import Any

from ..config import PRECISIONS
from ..configio import ConfigIO, _f
from ..errors import InputError
from .registry import get_attack, registered_attacks

# Fields that do not change what an attack computes (a resumed attack may differ in them).
RUN_IDENTITY_EXCLUDE = {
    "steps",
    "save_every",
    "device",
    "output",
    "state_path",
    "cache_dir",
    "model",
    "images",
    "gradient_checkpointing",
}


# The attacks' own settings (one registry line each): AttackConfig has their fields, flat.
ATTACK_SETTINGS = {
    "lora": "apdm_core.attack.lora.settings:LoRASettings",
    "textual_inversion": "apdm_core.attack.textual_inversion.settings:TextualInversionSettings",
}


def attack_settings_classes() -> tuple[type, ...]:
    from ..registry import load

    return tuple(load(spec) for spec in ATTACK_SETTINGS.values())


def inactive_attack_settings(kind: str) -> set[str]:
    """The settings of every attack but ``kind`` (they do not change a ``kind`` attack)."""
    from ..registry import load

    return {f.name for name, spec in ATTACK_SETTINGS.items() if name != kind for f in fields(load(spec))}


@dataclass
class RunAttackSettings(ConfigIO):
    """The settings every attack shares; each attack with settings of its own adds them (ATTACK_SETTINGS)."""

    # --- what to attack --------------------------------------------------------------
    model: str = _f("", "Model to attack: a diffusers folder or a .safetensors checkpoint.", group="io")
    images: list[str] = _f([], "Subject images the attacker has: a folder or png/jpg/webp files.", group="io")
    output: str = _f(
        "",
        "Where to write the attack's result (a new folder): the fine-tuned model (dreambooth), "
        "pytorch_lora_weights.safetensors (lora) or learned_embeds.safetensors (textual_inversion).",
        group="io",
    )
    class_images: str = _f(
        "", "Optional folder of class images for prior preservation; missing ones are generated.", group="io"
    )
    cache_dir: str = _f(
        "", "Cache for generated class images (default: $APDM_CACHE_DIR or ~/.cache/apdm).", group="io"
    )
    state_path: str = _f(
        "", "Resumable state file (default: <output>.apdm-attack-state.pt, else in the cache).", group="io"
    )
    # --- the attack --------------------------------------------------------------------
    kind: str = _f(
        "dreambooth",
        "Attack: 'dreambooth' (full UNet fine-tune, the paper's attack), 'lora' (LoRA DreamBooth via "
        "peft) or 'textual_inversion' (one new token embedding).",
        group="basic",
    )
    instance_prompt: str = _f(
        "a photo of sks person", "Prompt the attacker trains with (identifier + class).", group="basic"
    )
    class_prompt: str = _f(
        "a photo of person", "Class prompt for prior preservation (and the class noun).", group="basic"
    )
    identifier: str = _f(
        "sks",
        "The word of instance_prompt that names the subject (textual_inversion replaces it by its token).",
        group="basic",
    )
    steps: int | None = _f(
        None, "Training steps (None = the attack's default: 800 dreambooth/lora, 2000 TI).", group="basic"
    )
    lr: float | None = _f(
        None,
        "Learning rate (None = the attack's default: 5e-6 dreambooth, 1e-4 lora, 5e-3 textual_inversion).",
        group="basic",
    )
    batch_size: int = _f(1, "Subject images per step (plus as many class images with prior preservation).")
    num_class_images: int = _f(200, "Class images for prior preservation (DreamBooth uses 200).")
    prior_weight: float | None = _f(
        None, "Prior-preservation weight (None = 1.0 for dreambooth/lora, 0 for textual_inversion)."
    )
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this value each step (0 = no clipping).")
    random_crop: bool = _f(
        True,
        "Random crop of each training view (as diffusers' train_dreambooth); off = center crop. "
        "Square photos at the training size only vary with crop_scale > 1.",
    )
    crop_scale: float = _f(
        1.0, "Resize the short side to resolution * crop_scale before cropping (>1 zooms in, >= 1)."
    )
    random_flip: bool = _f(False, "Mirror each training view with probability 1/2.")
    resolution: int = _f(0, "Training resolution in pixels; 0 = the model's native size (512 for SD1.5).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    # --- generation of class images ------------------------------------------------------
    sample_steps: int = _f(50, "Denoising steps when generating class images.")
    guidance_scale: float = _f(7.5, "Classifier-free guidance when generating class images.")
    sample_batch_size: int = _f(4, "Class images generated per batch.")
    # --- run control ---------------------------------------------------------------------
    seed: int = _f(0, "Seed for everything random in the attack.", group="basic")
    device: str = _f("auto", "'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")
    mixed_precision: str = _f("no", "Autocast precision for the UNet passes.", PRECISIONS)
    gradient_checkpointing: bool = _f(
        False, "Recompute UNet activations in the backward pass (dreambooth/lora): less memory, ~30% slower."
    )
    save_every: int = _f(100, "Write the resumable state every K steps (0 = only when stopped).")


@dataclass
class AttackConfig(*attack_settings_classes(), RunAttackSettings):
    """Every setting of an attack: the shared ones plus each attack's own (flat keys)."""

    def __post_init__(self) -> None:
        self.coerce_types()
        self.normalize_images()
        self.lora_targets = [str(t) for t in self.lora_targets]
        self.validate()

    # ------------------------------------------------------------------------------------
    def validate(self) -> AttackConfig:
        """Raise InputError naming the field and the fix when a value is out of range."""
        self.check_choices()
        if self.kind not in registered_attacks():
            raise InputError(
                f"AttackConfig.kind={self.kind!r} is not a known attack; choose one of "
                f"{', '.join(registered_attacks())}."
            )
        self.check_ranges(
            at_least_one=(
                "batch_size",
                "sample_steps",
                "sample_batch_size",
                "steps",
            ),
            non_negative_int=("num_class_images", "resolution", "save_every", "seed"),
            positive=("adam_epsilon", "lr"),
            non_negative=("max_grad_norm", "adam_weight_decay", "guidance_scale", "prior_weight"),
            unit_interval=("adam_beta1", "adam_beta2"),
        )
        if not (self.crop_scale >= 1 and math.isfinite(self.crop_scale)):
            raise InputError(f"AttackConfig.crop_scale must be >= 1 (got {self.crop_scale}).")
        self.check_resolution_and_prompts()
        if not self.identifier.strip() or not re.search(
            rf"(?<!\S){re.escape(self.identifier)}(?!\S)", self.instance_prompt
        ):
            raise InputError(
                f"AttackConfig.identifier={self.identifier!r} must be a word of instance_prompt "
                f"({self.instance_prompt!r}); e.g. identifier='sks' for 'a photo of sks person'."
            )
        for settings in attack_settings_classes():  # each attack checks its own settings
            settings.check(self)
        return self

    # ------------------------------------------------------------------------------------
    @property
    def class_noun(self) -> str:
        """The class word ('person' for 'a photo of person')."""
        return self.class_prompt.split()[-1]

    def resolved(self) -> AttackConfig:
        """A copy with the attack's defaults filled in for steps, lr and prior_weight left at None."""
        defaults = get_attack(self.kind).defaults
        changes = {
            f.name: defaults[f.name]
            for f in fields(self)
            if f.name in defaults and getattr(self, f.name) is None
        }
        return dataclasses.replace(self, **changes)

    def identity_dict(self) -> dict[str, Any]:
        """The settings that determine an attack's trajectory (resolved; not the step count)."""
        skip = RUN_IDENTITY_EXCLUDE | inactive_attack_settings(self.kind)
        return {k: v for k, v in self.resolved().to_dict().items() if k not in skip}
