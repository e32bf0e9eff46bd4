"""``apdm demo``: the whole protection flow on a model that needs no download.

Until the pretrained demo world ships, the base model is a tiny randomly initialised
SD-shaped model built on the fly, and the subject is a procedurally drawn object. The flow
(pairs -> L2P/DPO protection -> protected model on disk) is the real one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .config import ProtectConfig
from .progress import ProgressCallback, StopCheck

DEMO_SETTINGS = {
    "instance_prompt": "a photo of sks dog",
    "class_prompt": "a photo of dog",
    "outer_steps": 20,
    "inner_steps": 4,
    "lr_protect": 1e-4,
    "lr_personalize": 1e-4,
    "num_class_images": 8,
    "sample_steps": 10,
    "guidance_scale": 3.0,
    "save_every": 10,
}


def draw_subject(seed: int, size: int = 96) -> Image.Image:
    """One 'photo' of a fixed demo subject: a striped red disc, in a varied pose and background."""
    rng = np.random.default_rng(seed)
    bg = tuple(int(c) for c in rng.integers(40, 200, 3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = size * rng.uniform(0.25, 0.35)
    cx, cy = size * rng.uniform(0.4, 0.6, 2)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(200, 40, 40))
    for k in range(-2, 3):
        y = cy + k * r / 3
        d.line((cx - r * 0.8, y, cx + r * 0.8, y), fill=(250, 220, 60), width=max(1, size // 32))
    return im


def run_demo(
    out: Path,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    overwrite: bool = False,
):
    from .protect import protect
    from .tiny import build_tiny_model

    out = Path(out)
    base = out / "base_model"
    if not (base / "model_index.json").exists():
        build_tiny_model(base, words=("a", "photo", "of", "sks", "dog"))
    subject_dir = out / "subject"
    subject_dir.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        path = subject_dir / f"subject_{i}.png"
        if not path.exists():
            draw_subject(i).save(path)
    config = ProtectConfig(
        model=str(base),
        images=[str(subject_dir)],
        output=str(out / "protected_model"),
        cache_dir=str(out / "cache"),
        **DEMO_SETTINGS,
    )
    config.save(out / "protect_config.yaml")
    return protect(config, progress=progress, should_stop=should_stop, overwrite=overwrite, resume=True)
