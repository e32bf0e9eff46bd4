"""Sample an attacked model with the evaluation prompts and score it with the registered metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from PIL import Image

from ..attack.base import replace_word
from ..data import load_subject_images
from ..models import SDModel
from ..pairs import sample_images
from ..progress import ProgressCallback, StopCheck, Tracker
from .config import EvalConfig
from .metrics import MetricContext, MetricResult, compute_metrics
from .prompts import sample_prompts, without_identifier


@dataclass
class EvalResult:
    samples: list[Image.Image]
    prompts: list[str]  # as written with the identifier (before any TI rewrite)
    metrics: dict[str, MetricResult]
    seeds: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def numbers(self) -> dict[str, float | None]:
        return {name: m.value for name, m in self.metrics.items()}


def generate_samples(
    model: SDModel,
    prompts: list[str],
    config: EvalConfig,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> tuple[list[Image.Image], list[int]]:
    """One image per prompt, sample i with seed eval_seed + i, through the model's own pipeline."""
    size = config.eval_resolution or model.native_resolution
    seeds = [config.eval_seed + i for i in range(len(prompts))]
    out: list[Image.Image | None] = [None] * len(prompts)
    tracker = Tracker("sample", len(prompts), progress, should_stop)
    for prompt in dict.fromkeys(prompts):
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        for k in range(0, len(idx), config.eval_batch_size):
            chunk = idx[k : k + config.eval_batch_size]
            images = sample_images(
                model,
                prompt,
                [seeds[i] for i in chunk],
                size,
                config.eval_steps,
                config.eval_guidance,
                config.eval_batch_size,
            )
            for i, im in zip(chunk, images):
                out[i] = im
            tracker.update(len(chunk))
    return out, seeds


def load_references(images, size: int) -> list[Image.Image]:
    """Subject photos (a folder, files or PIL images), oriented and size-checked, not cropped."""
    return [
        s.image for s in load_subject_images(images, size, min_side=None if size >= 256 else size, crop=False)
    ]


def evaluate(
    model: SDModel,
    references,
    config: EvalConfig | None = None,
    *,
    identifier: str = "sks",
    class_noun: str = "person",
    instance_prompt: str | None = None,
    prompt_map: dict[str, str] | None = None,
    heldout=None,
    samples: list[Image.Image] | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> EvalResult:
    """Sample ``model`` with the evaluation prompts and compute ``config.metrics``.

    ``references``: the subject's photos (folder, files or PIL images); ``heldout``: subject
    images the attack did not see, for the denoising score (default: the references).
    ``prompt_map`` rewrites the identifier for the attacked model (textual inversion: sks -> <sks>);
    ``AttackResult.prompt_map`` is exactly that. ``samples`` skips the generation.
    """
    config = config or EvalConfig()
    t0 = time.perf_counter()
    size = model.native_resolution
    refs = load_references(references, size)
    held = load_references(heldout, size) if heldout else []
    prompts = sample_prompts(config.num_samples, identifier, class_noun, config.prompts, config.prompt_set)

    def rewrite(text: str) -> str:
        for word, repl in (prompt_map or {}).items():
            text = replace_word(text, word, repl)
        return text

    seeds: list[int] = []
    if samples is None:
        samples, seeds = generate_samples(model, [rewrite(p) for p in prompts], config, progress, should_stop)
    instance = instance_prompt or f"a photo of {identifier} {class_noun}"
    ctx = MetricContext(
        references=refs,
        samples=list(samples),
        prompts=[rewrite(p) for p in prompts[: len(samples)]],
        text_prompts=[without_identifier(p, identifier) for p in prompts[: len(samples)]],
        config=config,
        model=model,
        heldout=held,
        instance_prompt=rewrite(instance),
        class_noun=class_noun,
    )
    metrics = compute_metrics(ctx, config.metrics, progress, should_stop)
    return EvalResult(list(samples), prompts[: len(samples)], metrics, seeds, time.perf_counter() - t0)
