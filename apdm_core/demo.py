"""``apdm demo``: the whole flow on the built-in demo world, on a CPU, with no download.

1. Four photos of a world subject the model has never seen (``DEMO_SUBJECT``) go to
   ``<out>/subject``.
2. The shipped world model (``apdm_core/world/assets/model``, a tiny SD-shaped model loaded
   like any SD folder) is protected against that subject: pairs, then L2P with the DPO loss,
   with a live progress bar; the protected model goes to ``<out>/protected_model``.
3. The attacker's DreamBooth runs on the base model and on the protected one; both are
   sampled with "a photo of sks <class>" and scored (the world's identity evaluator, the
   denoising score); the report (grid PNG, loss plot, report.json, summary.md) goes to
   ``<out>/report``.

The settings are the demo world's preset (``apdm_core.world.efficacy``), sized for a 2-core
CPU; ``benchmarks/efficacy.py`` measures the same preset over several subjects and seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import ProtectConfig
from .progress import ProgressCallback, StopCheck

DEMO_SUBJECT = 8  # `apdm world subject --seed 8`: a cyan ball with a yellow cap
DEMO_METRICS = ["world", "denoise"]


@dataclass
class DemoResult:
    protection: object  # ProtectResult
    comparison: object | None = None  # CompareResult (None when stopped or skipped)

    @property
    def cancelled(self) -> bool:
        return self.protection.cancelled or bool(self.comparison and self.comparison.cancelled)

    @property
    def report_dir(self) -> Path | None:
        return self.comparison.out_dir if self.comparison is not None else None


def write_subject_photos(folder: Path, seed: int = DEMO_SUBJECT, count: int = 4, start: int = 0):
    """Photos of the world subject ``seed`` in ``folder`` (kept when already there); returns the subject."""
    from .world import render

    subject = render.make_subject(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(render.photos(subject, count, start=start)):
        path = folder / f"{subject.name}_{start + i:02d}.png"
        if not path.exists():
            im.save(path)
    return subject


def demo_configs(out: Path, subject, attack_overrides: dict | None = None, **overrides):
    """(ProtectConfig, AttackConfig, EvalConfig) of the demo; ``overrides`` change the protection."""
    from .attack import AttackConfig
    from .evaluate import EvalConfig
    from .world import WORLD_MODEL_DIR, efficacy, render

    prompts = {
        "instance_prompt": render.instance_prompt(subject.cls),
        "class_prompt": render.class_prompt(subject.cls),
    }
    protect = ProtectConfig(
        model=str(WORLD_MODEL_DIR),
        images=[str(out / "subject")],
        output=str(out / "protected_model"),
        cache_dir=str(out / "cache"),
        **prompts,
        **{**efficacy.PROTECT_SETTINGS, **overrides},
    )
    attack = AttackConfig(
        cache_dir=str(out / "cache"), **prompts, **{**efficacy.ATTACK_SETTINGS, **(attack_overrides or {})}
    )
    evaluation = EvalConfig(
        prompts=["a photo of {id} {cls}"],
        num_samples=16,
        eval_steps=efficacy.SAMPLING["steps"],
        eval_guidance=efficacy.SAMPLING["guidance"],
        eval_batch_size=16,
        metrics=list(DEMO_METRICS),
        # what the protection costs: the subject's class and another class of the world, no attack
        utility_prompts=["a photo of {cls}", render.class_prompt(efficacy.target_class(subject.cls))],
        utility_samples=16,
    )
    return protect, attack, evaluation


def run_demo(
    out: str | Path,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    overwrite: bool = False,
    attack: bool = True,
    attack_overrides: dict | None = None,
    **overrides,
) -> DemoResult:
    """Protect the world model against the demo subject, then attack base and protected and report.

    ``overrides`` change the protection settings, ``attack_overrides`` the attack's;
    ``attack=False`` stops after the protection. A stopped run keeps its state; running it again
    continues the protection where it stopped.
    """
    from .evaluate import compare
    from .protection import protect
    from .world import load_world_model

    out = Path(out)
    subject = write_subject_photos(out / "subject")
    # photos the attacker does not train on: the denoising score's held-out images
    write_subject_photos(out / "subject_heldout", start=100)
    protect_config, attack_config, eval_config = demo_configs(out, subject, attack_overrides, **overrides)
    protect_config.save(out / "protect_config.yaml")
    base = load_world_model()
    protection = protect(protect_config, progress, should_stop, model=base, overwrite=overwrite, resume=True)
    result = DemoResult(protection)
    if protection.cancelled or not attack:
        return result
    result.comparison = compare(
        base,
        protection.model,
        str(out / "subject"),
        attack_config,
        eval_config,
        out_dir=out / "report",
        heldout=str(out / "subject_heldout"),
        protection_history=protection.history,
        progress=progress,
        should_stop=should_stop,
        overwrite=overwrite,
        grid_columns=8,
    )
    return result
