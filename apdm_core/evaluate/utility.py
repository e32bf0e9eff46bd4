"""What the protection cost, before any attack: the class prompt and an unrelated prompt sampled on the
unprotected and the protected model with the same seeds.

Per prompt: how alike the two models' images are (SSIM, scikit-image; 1 = the protection changed
nothing there) and, where a judge is available, how often the images show what the prompt names on
each model: the demo world's evaluator for world models (``world`` among the metrics), else nothing
(the images are in the report's grid to look at).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..models import SDModel
from ..pairs import sample_images
from ..progress import ProgressCallback, StopCheck, Tracker
from .config import EvalConfig


@dataclass
class UtilityRow:
    prompt: str
    similarity: float  # mean SSIM of protected vs unprotected images, seed by seed
    quality: dict[str, float] | None = None  # unprotected / protected: share showing what the prompt names
    samples: dict[str, list[Image.Image]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "similarity": self.similarity, "quality": self.quality}


def ssim(a: Image.Image, b: Image.Image) -> float:
    from skimage.metrics import structural_similarity

    x, y = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
    win = min(7, min(x.shape[:2]) // 2 * 2 - 1)
    return float(structural_similarity(x, y, channel_axis=2, data_range=255, win_size=win))


def judge_quality(images: list[Image.Image], prompt: str, config: EvalConfig) -> float | None:
    """The share of ``images`` that show what ``prompt`` names, where a judge knows it (the demo world's
    classes with the ``world`` metric on), else None."""
    from ..world import render

    noun = prompt.split()[-1] if prompt.split() else ""
    if "world" not in config.metrics or noun not in render.CLASSES:
        return None
    from ..world.evaluator import load_evaluator

    return load_evaluator().class_recognition(images, noun)["accuracy"]


def utility_rows(
    base: SDModel,
    protected: SDModel,
    class_noun: str,
    config: EvalConfig,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> list[UtilityRow]:
    """The utility prompts (``config.utility_prompts``, ``{cls}`` = the class noun) on both models."""
    prompts = [p.replace("{cls}", class_noun) for p in config.utility_prompts]
    n = config.utility_samples
    if not prompts or n < 1:
        return []
    seeds = [config.eval_seed + i for i in range(n)]
    size = config.eval_resolution or base.native_resolution
    tracker = Tracker("utility", 2 * len(prompts), progress, should_stop)
    rows = []
    for prompt in prompts:
        images = {}
        for name, model in (("unprotected", base), ("protected", protected)):
            images[name] = sample_images(model, prompt, seeds, size, config.eval_steps, config.eval_guidance,
                                         config.eval_batch_size)  # fmt: skip
            tracker.update(message=prompt)
        similarity = float(np.mean([ssim(a, b) for a, b in zip(images["unprotected"], images["protected"])]))
        quality = {name: judge_quality(ims, prompt, config) for name, ims in images.items()}
        rows.append(UtilityRow(prompt, similarity, quality if None not in quality.values() else None, images))
    return rows
