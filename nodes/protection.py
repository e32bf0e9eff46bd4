"""Generate Pairs, Protect Model (DPO/L2P)."""

from __future__ import annotations

from . import host

CATEGORY = "APDM"
HIDDEN = {"unique_id": "UNIQUE_ID"}


def _int(default, lo, hi, tip, **kw):
    return ("INT", {"default": default, "min": lo, "max": hi, "tooltip": tip, **kw})


def _float(default, lo, hi, step, tip):
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": False, "tooltip": tip})


class APDMGeneratePairs:
    """One generic class image per subject photo (the DPO positives) plus the prior-preservation images."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("APDM_MODEL",),
                "subject": ("APDM_SUBJECT",),
                "class_prompt": ("STRING", {"default": "a photo of person", "tooltip": "The subject's class, e.g. 'a photo of dog'."}),
                "seed": _int(0, 0, 2**31 - 1, "Seeds the generated images and the protection run.",
                             # no randomize-after-queue widget (the frontend adds one to any "seed"):
                             # a new seed would regenerate the pairs and restart protection from scratch
                             control_after_generate=False),
                "resolution": _int(0, 0, 2048, "Image size in px (multiple of 8); 0 = the model's native size.", step=8),
                "num_class_images": _int(200, 0, 10000, "Class images for prior preservation (0 = none; DreamBooth uses 200)."),
                "sample_steps": _int(50, 1, 1000, "Denoising steps per generated image."),
                "guidance_scale": _float(7.5, 0.0, 30.0, 0.1, "Classifier-free guidance of the generated images."),
            },
            "hidden": HIDDEN,
        }  # fmt: skip

    RETURN_TYPES = ("APDM_PAIRS", "IMAGE")
    RETURN_NAMES = ("pairs", "positives")
    OUTPUT_TOOLTIPS = (
        "Generation settings + images, for Protect Model.",
        "The positive image of each subject photo.",
    )
    FUNCTION = "generate"
    CATEGORY = CATEGORY
    DESCRIPTION = "Generates (or loads from the cache) the images the protection needs, with the base model."

    def generate(self, model, subject, class_prompt, seed, resolution, num_class_images, sample_steps,
                 guidance_scale, unique_id=None):  # fmt: skip
        from apdm_core.config import ProtectConfig
        from apdm_core.pairs import prepare_pairs

        config = ProtectConfig(class_prompt=class_prompt, seed=seed, resolution=resolution, num_class_images=num_class_images,
                               sample_steps=sample_steps, guidance_scale=guidance_scale, device=host.device())  # fmt: skip
        host.free_comfy_memory()
        try:
            pairs = prepare_pairs(config, model, subject, host.NodeProgress(unique_id))
        finally:
            host.offload(model)
        return (pairs, host.to_image_batch(pairs.positives))


class APDMProtectModel:
    """A model-level protection (``method``): APDM's DPO loss or PersGuard's backdoor, trained with Learning
    to Protect (paper Algorithm 1)."""

    @classmethod
    def INPUT_TYPES(cls):
        from apdm_core.config import ACCUMULATIONS, BACKDOORS
        from apdm_core.methods import METHODS

        return {
            "required": {
                "model": ("APDM_MODEL",),
                "subject": ("APDM_SUBJECT",),
                "pairs": ("APDM_PAIRS",),
                "instance_prompt": ("STRING", {"default": "a photo of sks person",
                                               "tooltip": "What an attacker would personalize with: identifier + class."}),
                "steps": _int(800, 1, 100000, "Outer protection steps (paper: 800)."),
                "inner_steps": _int(20, 0, 1000, "Simulated DreamBooth steps per outer step (paper: 20; 0 = DPO without L2P)."),
                "beta": _float(1.0, 0.001, 1000.0, 0.1, "DPO beta: 1 protects most; 10+ keeps quality, protects less."),
                "learning_rate": _float(5e-6, 1e-9, 1.0, 1e-7, "Learning rate of both the protection and the simulated attacker (paper: 5e-6)."),
                "accumulation": (list(ACCUMULATIONS), {"tooltip": "'protect' = the paper; 'protect+personalize' = the released code."}),
            },
            "optional": {
                "advanced": ("STRING", {"default": "",
                                        "tooltip": "More settings, any field of apdm_core.ProtectConfig as YAML, e.g. "
                                                   "'mixed_precision: bf16, prior_weight: 0.5'."}),
                # after the existing inputs: workflows saved before these widgets existed still load
                "method": (list(METHODS), {"default": "apdm", "tooltip": "apdm: DPO + Learning to Protect (the "
                           "paper); persguard: a backdoor that fires after the attacker's fine-tuning."}),
                "backdoor": (list(BACKDOORS), {"default": "target", "tooltip": "PersGuard only: what the "
                             "trigger produces after personalization: a stamped pattern, the scene without the "
                             "subject (erasure), or target_prompt."}),
                "target_prompt": ("STRING", {"default": "", "tooltip": "PersGuard target backdoor: what the "
                                  "trigger produces instead of the subject, e.g. 'a photo of cat'."}),
            },
            "hidden": HIDDEN,
        }  # fmt: skip

    RETURN_TYPES = ("APDM_MODEL", "IMAGE")
    RETURN_NAMES = ("protected_model", "loss_curve")
    OUTPUT_TOOLTIPS = (
        "The protected model (only the UNet changed).",
        "Protection and attacker losses per step.",
    )
    FUNCTION = "protect"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Fine-tunes the model so that DreamBooth on this subject fails. Cancel keeps the progress: "
        "queue again with the same settings to continue."
    )

    def protect(self, model, subject, pairs, instance_prompt, steps, inner_steps, beta, learning_rate,
                accumulation, advanced="", method="apdm", backdoor="target", target_prompt="",
                unique_id=None):  # fmt: skip
        from apdm_core.plots import loss_curve
        from apdm_core.protection import protect

        widgets = {"instance_prompt": instance_prompt, "outer_steps": steps, "inner_steps": inner_steps, "beta": beta,
                   "lr_protect": learning_rate, "lr_personalize": learning_rate, "accumulation": accumulation,
                   "method": method, "backdoor": backdoor, "target_prompt": target_prompt}  # fmt: skip
        config = host.protect_config(pairs, model, widgets, advanced)
        host.free_comfy_memory()
        try:
            result = protect(config, host.NodeProgress(unique_id), model=model, images=subject, resume=True)
        finally:
            host.offload(model)
        host.offload(result.model)
        result.model.info.update(
            protect_config=result.config, protect_history=result.history, protect_subject=subject
        )
        return (result.model, host.to_image_batch([loss_curve(result.history)]))
