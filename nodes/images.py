"""Protect Images: image-level protection (ASPL or LDU) of an IMAGE batch."""

from __future__ import annotations

from . import host
from .protection import HIDDEN, _int

CATEGORY = "APDM"


class APDMProtectImages:
    """Perturb photos so that DreamBooth on them fails (for owners who do not control the model)."""

    @classmethod
    def INPUT_TYPES(cls):
        from apdm_core.images import IMAGE_METHODS

        return {
            "required": {
                "model": (
                    "APDM_MODEL",
                    {"tooltip": "The surrogate: the model an attacker would most likely use."},
                ),
                "images": ("IMAGE", {"tooltip": "The photos to protect (e.g. from Load Image)."}),
                "method": (
                    list(IMAGE_METHODS),
                    {
                        "tooltip": "aspl: Anti-DreamBooth pixel PGD against a surrogate "
                        "DreamBooth; ldu: Latent Diffusion Unlearning (a shifted latent trajectory)."
                    },
                ),
                "budget": _int(8, 1, 64, "Largest change of any pixel channel, in 1/255 steps (8 = 8/255)."),
                "instance_prompt": (
                    "STRING",
                    {
                        "default": "a photo of sks person",
                        "tooltip": "The prompt an attacker would fine-tune with.",
                    },
                ),
                "class_prompt": (
                    "STRING",
                    {"default": "a photo of person", "tooltip": "The subject's class."},
                ),
                "steps": _int(
                    50, 1, 10000, "Iterations (ASPL: surrogate + PGD rounds; LDU: Lagrangian steps)."
                ),
                "seed": _int(0, 0, 2**31 - 1, "Seeds the run.", control_after_generate=False),
            },
            "optional": {
                "advanced": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "More settings, any field of "
                        "apdm_core.images.ImageProtectConfig as YAML, e.g. 'pgd_steps: 10'.",
                    },
                ),
            },
            "hidden": HIDDEN,
        }

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("protected_images", "report")
    OUTPUT_TOOLTIPS = (
        "The protected photos (square crops at the model's size); save them with Save Image (PNG, lossless).",
        "PSNR / SSIM / largest change of each photo.",
    )
    FUNCTION = "protect"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Adds a bounded perturbation to the photos so personalization on them fails. Cancel keeps the "
        "progress: queue again with the same settings to continue."
    )

    def protect(
        self,
        model,
        images,
        method,
        budget,
        instance_prompt,
        class_prompt,
        steps,
        seed,
        advanced="",
        unique_id=None,
    ):
        from apdm_core.images import ImageProtectConfig, protect_images

        values = {
            "method": method,
            "budget": budget / 255,
            "instance_prompt": instance_prompt,
            "class_prompt": class_prompt,
            "steps": steps,
            "seed": seed,
            "device": host.device(),
        }
        values.update(host.parse_settings(advanced))
        config = ImageProtectConfig.from_dict(values)
        host.free_comfy_memory()
        try:
            result = protect_images(
                config,
                host.NodeProgress(unique_id),
                model=model,
                images=host.from_image_batch(images),
                resume=True,
            )
        finally:
            host.offload(model)
        report = "\n".join(
            f"{n}: PSNR {m['psnr']:.1f} dB, SSIM {m['ssim']:.3f}, max change {m['max_change']}/255"
            for n, m in zip(result.names, result.metrics)
        )
        return (host.to_image_batch(result.images), report)
