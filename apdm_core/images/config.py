"""ImageProtectConfig: every setting of an image-level protection run (``apdm protect-images``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import MODEL_TYPES, PRECISIONS
from ..configio import ConfigIO, _f
from ..errors import InputError

# name -> "module:class" of each image-level method, imported on first use (one line per method)
METHODS = {"aspl": "apdm_core.images.aspl:ASPL", "ldu": "apdm_core.images.ldu:LDU"}
IMAGE_METHODS = tuple(METHODS)


@dataclass
class ImageProtectConfig(ConfigIO):
    # --- what to protect -------------------------------------------------------------
    model: str = _f(
        "", "Surrogate model: a diffusers folder or a single-file .safetensors checkpoint.", group="io"
    )
    model_type: str = _f(
        "auto",
        "Single-file checkpoints: auto, sd1, sd2, sd2-v, sdxl, sdxl-v, or a diffusers config folder.",
        group="io",
    )
    images: list[str] = _f([], "The photos to protect: a folder or png/jpg/webp files.", group="io")
    output: str = _f(
        "", "A new folder for the protected PNGs (same names as the photos, never over them).", group="io"
    )
    class_images: str = _f(
        "", "Optional folder of class images for the surrogate's prior preservation.", group="io"
    )
    cache_dir: str = _f(
        "", "Cache for generated class images (default: $APDM_CACHE_DIR or ~/.cache/apdm).", group="io"
    )
    state_path: str = _f("", "Resumable state file (default: <output>.apdm-images-state.pt).", group="io")
    # --- the method ------------------------------------------------------------------
    method: str = _f(
        "aspl",
        "'aspl': Anti-DreamBooth's pixel PGD against a surrogate DreamBooth; 'ldu': Latent Diffusion "
        "Unlearning, a learned shift of the inverted terminal latent, decoded by few-step denoising.",
        IMAGE_METHODS,
        group="basic",
    )
    budget: float = _f(
        8 / 255,
        "Largest change of any pixel channel (L-infinity, in [0, 1]; '8/255' is accepted).",
        group="basic",
    )
    instance_prompt: str = _f(
        "a photo of sks person", "The prompt an attacker would fine-tune with.", group="basic"
    )
    class_prompt: str = _f(
        "a photo of person", "The class prompt (prior preservation, LDU's trajectory).", group="basic"
    )
    steps: int = _f(
        50, "Outer iterations (ASPL: surrogate + PGD rounds; LDU: Lagrangian steps).", group="basic"
    )
    # ASPL (Anti-DreamBooth defaults)
    surrogate_steps: int = _f(
        3, "ASPL: DreamBooth steps of the surrogate per round (on clean, then on protected)."
    )
    pgd_steps: int = _f(6, "ASPL: signed-gradient steps on the pixels per round.")
    pgd_alpha: float = _f(1 / 255, "ASPL: pixel step size of each signed-gradient step (in [0, 1]).")
    lr: float = _f(5e-6, "ASPL: the surrogate's learning rate (DreamBooth's).")
    prior_weight: float = _f(1.0, "ASPL: prior-preservation weight of the surrogate's DreamBooth.")
    num_class_images: int = _f(50, "ASPL: class images for the surrogate's prior preservation.")
    # LDU
    denoise_steps: int = _f(4, "LDU: DDIM steps of the inversion and of the (differentiable) denoising back.")
    latent_lr: float = _f(0.05, "LDU: Adam learning rate of the terminal-latent shift.")
    dual_lr: float = _f(10.0, "LDU: step of the Lagrange multiplier on the budget violation.")
    # --- sampling, run control ---------------------------------------------------------
    resolution: int = _f(
        0, "Working resolution (0 = the model's native size); photos are center-cropped to it."
    )
    sample_steps: int = _f(50, "Denoising steps when generating class images.")
    guidance_scale: float = _f(7.5, "Classifier-free guidance when generating class images.")
    sample_batch_size: int = _f(4, "Class images generated per batch.")
    seed: int = _f(0, "Seed for everything random.", group="basic")
    device: str = _f("auto", "'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")
    mixed_precision: str = _f("no", "Autocast precision for the UNet passes.", PRECISIONS)
    save_every: int = _f(10, "Write the resumable state every K iterations (0 = only when stopped).")

    def __post_init__(self) -> None:
        if isinstance(self.budget, str) and "/" in self.budget:  # "8/255"
            num, _, den = self.budget.partition("/")
            try:
                self.budget = float(num) / float(den)
            except (ValueError, ZeroDivisionError):
                raise InputError(
                    f"ImageProtectConfig.budget={self.budget!r}: give e.g. 8/255 or 0.03."
                ) from None
        self.coerce_types()
        self.normalize_images()
        self.validate()

    def validate(self) -> ImageProtectConfig:
        self.check_choices()
        self.check_ranges(
            at_least_one=(
                "steps",
                "surrogate_steps",
                "pgd_steps",
                "denoise_steps",
                "sample_steps",
                "sample_batch_size",
            ),
            non_negative_int=("num_class_images", "resolution", "seed", "save_every"),
            positive=("pgd_alpha", "lr", "latent_lr", "budget"),
            non_negative=("prior_weight", "dual_lr", "guidance_scale"),
        )
        if self.budget >= 1:
            raise InputError(f"ImageProtectConfig.budget={self.budget} must be below 1 (e.g. 8/255 = 0.031).")
        if self.model_type not in MODEL_TYPES and not Path(self.model_type).is_dir():
            raise InputError(
                f"ImageProtectConfig.model_type={self.model_type!r}: one of {', '.join(MODEL_TYPES)}."
            )
        self.check_resolution_and_prompts()
        return self

    @property
    def budget_levels(self) -> int:
        """The budget in 8-bit levels: the output's largest change (never above ``budget``)."""
        return int(self.budget * 255 + 1e-6)
