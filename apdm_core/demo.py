"""``apdm demo``: the whole protection flow on the built-in demo world, no download.

The base model is the shipped world model (``apdm_core/world/assets/model``: a tiny
SD-shaped model pretrained on the procedural world, loaded like any SD folder); the subject
is a public world subject the model has never seen (seed ``DEMO_SUBJECT``), four photos of
it are written to ``<out>/subject``. The flow (pairs -> L2P/DPO protection with live progress
-> protected model on disk) is the real one, with settings sized for a 2-core CPU.
"""

from __future__ import annotations

from pathlib import Path

from .config import ProtectConfig
from .progress import ProgressCallback, StopCheck

DEMO_SUBJECT = 1  # `apdm world subject --seed 1`
DEMO_SETTINGS = {
    "outer_steps": 40,
    "inner_steps": 10,
    "lr_protect": 1e-4,
    "lr_personalize": 2e-4,
    "num_class_images": 50,
    "sample_steps": 25,
    "guidance_scale": 4.0,
    "sample_batch_size": 16,
    "save_every": 10,
}


def write_subject_photos(folder: Path, seed: int = DEMO_SUBJECT, count: int = 4):
    """Photos of the world subject ``seed`` in ``folder`` (kept when already there); returns the subject."""
    from .world import render

    subject = render.make_subject(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(render.photos(subject, count)):
        path = folder / f"{subject.name}_{i:02d}.png"
        if not path.exists():
            im.save(path)
    return subject


def run_demo(
    out: Path,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    overwrite: bool = False,
    **overrides,
):
    """Protect the world model against personalization of the demo subject; ``overrides`` change settings."""
    from .protect import protect
    from .world import WORLD_MODEL_DIR, render

    out = Path(out)
    subject = write_subject_photos(out / "subject")
    config = ProtectConfig(
        model=str(WORLD_MODEL_DIR),
        images=[str(out / "subject")],
        instance_prompt=render.instance_prompt(subject.cls),
        class_prompt=render.class_prompt(subject.cls),
        output=str(out / "protected_model"),
        cache_dir=str(out / "cache"),
        **{**DEMO_SETTINGS, **overrides},
    )
    config.save(out / "protect_config.yaml")
    return protect(config, progress=progress, should_stop=should_stop, overwrite=overwrite, resume=True)
