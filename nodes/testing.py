"""Test Personalization: attack the base and the protected model the same way, report the difference."""

from __future__ import annotations

from . import host
from .protection import HIDDEN, _float, _int

CATEGORY = "APDM"


class APDMTestPersonalization:
    """apdm_core.evaluate.compare as a node: the same attack on both models, pictures and numbers."""

    @classmethod
    def INPUT_TYPES(cls):
        from apdm_core.attack import registered_attacks

        return {
            "required": {
                "base_model": (
                    "APDM_MODEL",
                    {"tooltip": "The unprotected model (Load Model for Protection)."},
                ),
                "protected_model": ("APDM_MODEL", {"tooltip": "The output of Protect Model."}),
                "subject": (
                    "APDM_SUBJECT",
                    {"tooltip": "The photos the attacker has (also the references)."},
                ),
                "attack": (
                    list(registered_attacks()),
                    {
                        "tooltip": "dreambooth = the paper's attack (full UNet); "
                        "lora = what most users run; textual_inversion = one token."
                    },
                ),
                "instance_prompt": (
                    "STRING",
                    {
                        "default": "a photo of sks person",
                        "tooltip": "The attacker's prompt: identifier + class.",
                    },
                ),
                "class_prompt": (
                    "STRING",
                    {"default": "a photo of person", "tooltip": "Class prompt (prior preservation)."},
                ),
                "steps": _int(
                    0, 0, 100000, "Attack steps; 0 = the attack's default (800; textual inversion 2000)."
                ),
                "learning_rate": _float(
                    0.0, 0.0, 1.0, 1e-7, "Attack learning rate; 0 = the attack's default."
                ),
                "num_samples": _int(30, 1, 1000, "Images sampled from each attacked model."),
                "seed": _int(
                    0, 0, 2**31 - 1, "Seeds the attack and the samples.", control_after_generate=False
                ),
            },
            "optional": {
                "advanced": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "More settings: fields of AttackConfig or EvalConfig, e.g. "
                        "'lora_rank: 8, metrics: [denoise, dino], eval_steps: 30'.",
                    },
                ),
            },
            "hidden": HIDDEN,
        }

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("report_grid", "metrics")
    OUTPUT_TOOLTIPS = (
        "Rows: the subject photos, unprotected + attack, protected + attack.",
        "The metrics table (Markdown); the full report is in output/apdm_reports/.",
    )
    OUTPUT_NODE = True
    FUNCTION = "test"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Runs the same personalization attack on the base and the protected model and writes a report "
        "(grid, metrics, losses) to ComfyUI's output/apdm_reports/. Cancel keeps the progress."
    )

    def test(
        self,
        base_model,
        protected_model,
        subject,
        attack,
        instance_prompt,
        class_prompt,
        steps,
        learning_rate,
        num_samples,
        seed,
        advanced="",
        unique_id=None,
    ):
        from apdm_core.evaluate import compare

        widgets = {
            "kind": attack,
            "instance_prompt": instance_prompt,
            "class_prompt": class_prompt,
            "steps": steps or None,
            "lr": learning_rate or None,
            "seed": seed,
            "num_samples": num_samples,
            "eval_seed": seed,
        }
        attack_config, eval_config = host.test_configs(widgets, advanced)
        out = host.report_folder(base_model, protected_model, subject, attack_config, eval_config)
        if not (out / "report.json").exists():  # the same test ran before: show its report
            host.free_comfy_memory()
            try:
                compare(
                    base_model,
                    protected_model,
                    subject,
                    attack_config,
                    eval_config,
                    out_dir=out,
                    resume=True,
                    protection_history=protected_model.info.get("protect_history"),
                    progress=host.NodeProgress(unique_id),
                )
            finally:
                host.offload(base_model, protected_model)
        return host.report_outputs(out)
