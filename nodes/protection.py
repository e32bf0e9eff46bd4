"""Generate Pairs, Protect Model (DPO/L2P)."""

from __future__ import annotations

from . import host

CATEGORY = "APDM"
HIDDEN = {"unique_id": "UNIQUE_ID"}


def _int(default, lo, hi, tip, **kw):
    return ("INT", {"default": default, "min": lo, "max": hi, "tooltip": tip, **kw})


def _float(default, lo, hi, step, tip):
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": False, "tooltip": tip})


def _setting(name: str, lo=None, hi=None, step=None, **kw):
    """The widget of the ProtectConfig setting ``name``: its default and help text from the engine's
    config (one source for the CLI help, the page and the nodes); numbers get ``lo``/``hi``/``step``."""
    from apdm_core.config import ProtectConfig
    from apdm_core.configio import config_field, field_default, field_help

    default, tip = field_default(ProtectConfig, name), field_help(ProtectConfig, name)
    choices = config_field(ProtectConfig, name).metadata.get("choices")
    if choices:
        return (list(choices), {"default": default, "tooltip": tip, **kw})
    if isinstance(default, bool):
        return ("BOOLEAN", {"default": default, "tooltip": tip, **kw})
    if isinstance(default, int):
        return _int(default, lo, hi, tip, **kw)
    if isinstance(default, float):
        return _float(default, lo, hi, step, tip)
    return ("STRING", {"default": default, "tooltip": tip, **kw})


class APDMGeneratePairs:
    """One generic class image per subject photo (the DPO positives) plus the prior-preservation images."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("APDM_MODEL",),
                "subject": ("APDM_SUBJECT",),
                "class_prompt": _setting("class_prompt"),
                # no randomize-after-queue widget (the frontend adds one to any "seed"): a new seed would
                # regenerate the pairs and restart protection from scratch
                "seed": _setting("seed", 0, 2**31 - 1, control_after_generate=False),
                "resolution": _setting("resolution", 0, 2048, step=8),
                "num_class_images": _setting("num_class_images", 0, 10000),
                "sample_steps": _setting("sample_steps", 1, 1000),
                "guidance_scale": _setting("guidance_scale", 0.0, 30.0, 0.1),
            },
            "hidden": HIDDEN,
        }

    RETURN_TYPES = ("APDM_PAIRS", "IMAGE")
    RETURN_NAMES = ("pairs", "positives")
    OUTPUT_TOOLTIPS = (
        "Generation settings + images, for Protect Model.",
        "The positive image of each subject photo.",
    )
    FUNCTION = "generate"
    CATEGORY = CATEGORY
    DESCRIPTION = "Generates (or loads from the cache) the images the protection needs, with the base model."

    def generate(
        self,
        model,
        subject,
        class_prompt,
        seed,
        resolution,
        num_class_images,
        sample_steps,
        guidance_scale,
        unique_id=None,
    ):
        from apdm_core.config import ProtectConfig
        from apdm_core.pairs import prepare_pairs

        config = ProtectConfig(
            class_prompt=class_prompt,
            seed=seed,
            resolution=resolution,
            num_class_images=num_class_images,
            sample_steps=sample_steps,
            guidance_scale=guidance_scale,
            device=host.device(),
        )
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
        return {
            "required": {
                "model": ("APDM_MODEL",),
                "subject": ("APDM_SUBJECT",),
                "pairs": ("APDM_PAIRS",),
                "instance_prompt": _setting("instance_prompt"),
                "steps": _setting("outer_steps", 1, 100000),
                "inner_steps": _setting("inner_steps", 0, 1000),
                "beta": _setting("beta", 0.001, 1000.0, 0.1),
                # one widget for both learning rates (the paper's: the same)
                "learning_rate": _setting("lr_protect", 1e-9, 1.0, 1e-7),
                "accumulation": _setting("accumulation"),
            },
            "optional": {
                "advanced": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "More settings, any field of apdm_core.ProtectConfig as YAML, e.g. "
                        "'mixed_precision: bf16, prior_weight: 0.5'.",
                    },
                ),
                # after the existing inputs: workflows saved before these widgets existed still load
                "method": _setting("method"),
                "backdoor": _setting("backdoor"),
                "target_prompt": _setting("target_prompt"),
                "more_subjects": (
                    "APDM_SUBJECTS",
                    {
                        "tooltip": "More subjects protected in the same run (Add "
                        "Subject nodes); the protection takes the subjects in turn."
                    },
                ),
                "preset": (
                    list(host.PERFORMANCE_PRESETS),
                    {
                        "default": "auto",
                        "tooltip": "How the protection "
                        "is computed (not what): auto picks for this GPU's memory (fast >= 40 GB, low-memory, "
                        "low-memory-8bit with bitsandbytes under 16 GB; SDXL: sdxl-24gb under 32 GB, which also "
                        "narrows the simulated attacker to the attention layers), none on a CPU; auto leaves out "
                        "levers the run's settings cannot run with. README 'Performance', 'SDXL'.",
                    },
                ),
                "original_model": (
                    "APDM_MODEL",
                    {
                        "tooltip": "Adding a subject to an already protected model: the original model it "
                        "was protected from. The anchor and the protection targets then come from it, so the "
                        "second round does not compound the first one's drift (connect it to Generate Pairs "
                        "too). "
                        "Add the earlier subjects as more_subjects to keep them protected.",
                    },
                ),
            },
            "hidden": HIDDEN,
        }

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

    def protect(
        self,
        model,
        subject,
        pairs,
        instance_prompt,
        steps,
        inner_steps,
        beta,
        learning_rate,
        accumulation,
        advanced="",
        method="apdm",
        backdoor="target",
        target_prompt="",
        more_subjects=None,
        preset="auto",
        original_model=None,
        unique_id=None,
    ):
        from apdm_core.plots import loss_curve
        from apdm_core.protection import protect

        widgets = {
            "instance_prompt": instance_prompt,
            "outer_steps": steps,
            "inner_steps": inner_steps,
            "beta": beta,
            "lr_protect": learning_rate,
            "lr_personalize": learning_rate,
            "accumulation": accumulation,
            "method": method,
            "backdoor": backdoor,
            "target_prompt": target_prompt,
            "preset": preset,
        }
        config = host.protect_config(pairs, model, widgets, advanced, original=original_model)
        more = list(more_subjects or [])
        if more:  # their photos come from the nodes (folders or IMAGE batches), not from the config
            config = config.replace(subjects=[{"images": ["<Add Subject>"], "instance_prompt": m["instance_prompt"],
                                               "class_prompt": m["class_prompt"]} for m in more])  # fmt: skip
        host.free_comfy_memory()
        try:
            result = protect(config, host.NodeProgress(unique_id), model=model, images=subject, resume=True,
                             subject_images=[m["images"] for m in more] or None,
                             reference=original_model)  # fmt: skip
        finally:
            host.offload(model)
            if original_model is not None:
                host.offload(original_model)
        host.offload(result.model)
        result.model.info.update(
            protect_config=result.config, protect_history=result.history, protect_subject=subject
        )
        return (result.model, host.to_image_batch([loss_curve(result.history)]))
