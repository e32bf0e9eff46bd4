"""Use the protected model: Save Protected Checkpoint, Protected Model to MODEL/CLIP/VAE, Sample Images."""

from __future__ import annotations

from . import host
from .protection import HIDDEN, _float, _int

CATEGORY = "APDM"


class APDMToComfyModel:
    """The protected model as ComfyUI's MODEL/CLIP/VAE, for KSampler, LoRA loaders, Save Checkpoint."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "protected_model": ("APDM_MODEL",),
                "strength": _float(
                    1.0, 0.0, 1.0, 0.05, "1 = the protected UNet; 0 = the MODEL input unchanged."
                ),
            },
            "optional": {
                "model": (
                    "MODEL",
                    {"tooltip": "MODEL of Load Checkpoint with the checkpoint that was protected."},
                ),
                "clip": ("CLIP", {"tooltip": "Passed through (the protection changes only the UNet)."}),
                "vae": ("VAE", {"tooltip": "Passed through (the protection changes only the UNet)."}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "convert"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies the protection as weight patches on a clone of the base checkpoint's MODEL."

    def convert(self, protected_model, strength, model=None, clip=None, vae=None):
        from apdm_core.errors import InputError

        from .comfy_model import patched_model

        if model is None:
            raise InputError(
                "Connect the MODEL (and CLIP, VAE) of a Load Checkpoint node that loads the checkpoint you "
                "protected; the protection is applied to it as weight patches."
            )
        return (patched_model(model, protected_model.unet, strength), clip, vae)


class APDMSaveProtectedCheckpoint:
    """Write the protected model where ComfyUI's loaders find it; never over an existing file unless asked."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "protected_model": ("APDM_MODEL",),
                "filename": (
                    "STRING",
                    {
                        "default": "apdm/protected",
                        "tooltip": "Name inside models/checkpoints ('.safetensors' is added), sub-folders "
                        "with '/'; a model loaded from a diffusers folder is written as a "
                        "folder in models/diffusers.",
                    },
                ),
                "overwrite": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Replace an existing file of that name."},
                ),
            }
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("The file (or folder) written.",)
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Single-file checkpoints are written in the source file's own layout (only the UNet replaced, "
        "APDM metadata added), so they load in Load Checkpoint and in A1111 as is."
    )

    def save(self, protected_model, filename, overwrite):
        from apdm_core.export import write_model

        info = protected_model.info
        path = write_model(
            protected_model,
            host.save_path(protected_model, filename),
            overwrite=overwrite,
            config=info.get("protect_config"),
            subjects=info.get("protect_subject"),
        )
        return {"ui": {"text": [str(path)]}, "result": (str(path),)}


class APDMSampleImages:
    """Text-to-image with an APDM model (base or protected), e.g. to check it still generates well."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("APDM_MODEL",),
                "prompt": ("STRING", {"default": "a photo of person", "multiline": True}),
                "negative_prompt": ("STRING", {"default": "", "multiline": True}),
                "seed": _int(0, 0, 2**31 - 1, "Image i uses seed + i.", control_after_generate=True),
                "count": _int(4, 1, 64, "Number of images."),
                "steps": _int(30, 1, 1000, "Denoising steps (the model's own scheduler)."),
                "guidance_scale": _float(7.5, 0.0, 30.0, 0.1, "Classifier-free guidance."),
                "resolution": _int(
                    0, 0, 2048, "Image size in px (multiple of 8); 0 = the model's native size.", step=8
                ),
            },
            "hidden": HIDDEN,
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = "Generates images with an APDM model using its own diffusers scheduler."

    def sample(
        self, model, prompt, negative_prompt, seed, count, steps, guidance_scale, resolution, unique_id=None
    ):
        from apdm_core.pairs import sample_images

        size = resolution or model.native_resolution
        model.to(host.device())
        try:
            images = sample_images(
                model,
                prompt,
                [seed + i for i in range(count)],
                size,
                steps,
                guidance_scale,
                negative_prompt=negative_prompt or None,
                progress=host.NodeProgress(unique_id),
            )
        finally:
            host.offload(model)
        return (host.to_image_batch(images),)
