"""Generated images the protection needs: one positive per subject image, and class images.

Positives (x+) and prior-preservation class images are generated once with the *base*
model from the class prompt and cached on disk under a key made of the model fingerprint,
prompt, size, sampler settings and seed, so a second run (or a resumed run) reuses them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from .config import ProtectConfig
from .data import SubjectImage, center_square, find_images, load_subject_images, open_image
from .fileio import atomic_write_bytes
from .models import SDModel, resolve_device
from .progress import ProgressCallback, StopCheck, Tracker


def default_cache_dir() -> Path:
    return Path(os.environ.get("APDM_CACHE_DIR") or Path.home() / ".cache" / "apdm")


def cache_key(
    model: SDModel, prompt: str, size: int, steps: int, guidance: float, seed: int, kind: str
) -> tuple[str, dict]:
    spec = {
        "kind": kind,
        "model": model.fingerprint(),
        "prompt": prompt,
        "size": size,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "sampler": type(model.scheduler).__name__,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16], spec


def name_seed(seed: int, name: str) -> int:
    """A per-image seed derived from the run seed and the subject's name (stable across runs)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8", "surrogateescape"))) % (2**31)


@torch.no_grad()
def sample_images(
    model: SDModel,
    prompt: str,
    seeds: list[int],
    size: int,
    steps: int,
    guidance: float,
    batch_size: int = 4,
    negative_prompt: str | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> list[Image.Image]:
    """Generate one image per seed with the model's own scheduler (one seeded generator per image).

    ``progress``/``should_stop`` (optional) are called once per batch (stage "sample").
    """
    pipe = model.pipeline()
    tracker = Tracker("sample", len(seeds), progress, should_stop) if progress or should_stop else None
    out: list[Image.Image] = []
    for i in range(0, len(seeds), batch_size):
        chunk = seeds[i : i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in chunk]
        result = pipe(
            prompt=[prompt] * len(chunk),
            negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="pil",
        )
        out.extend(result.images)
        if tracker is not None:
            tracker.update(len(chunk))
    return out


def _save_png(path: Path, image: Image.Image, meta: dict) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("apdm", json.dumps(meta, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


def _load_png(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _generate_missing(
    model: SDModel,
    prompt: str,
    jobs: list[tuple[Path, int, dict]],
    stage: str,
    size: int,
    steps: int,
    guidance: float,
    batch_size: int,
    progress: ProgressCallback | None,
    should_stop: StopCheck | None,
) -> None:
    """Generate the (path, seed, metadata) jobs whose file is missing, saving batch by batch.

    The batches are the index-aligned blocks of ``batch_size`` jobs, and a block with a missing file is
    generated whole (only the missing files are written): on a CPU the other images of a batch move a
    sample by a pixel level, so an image must not depend on which others the cache already held.
    """
    blocks = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    todo = [b for b in blocks if any(not path.exists() for path, _, _ in b)]
    if not todo:
        return
    tracker = Tracker(stage, sum(len(b) for b in todo), progress, should_stop)
    for chunk in todo:
        images = sample_images(
            model, prompt, [seed for _, seed, _ in chunk], size, steps, guidance, batch_size
        )
        for (path, _, meta), im in zip(chunk, images):
            if not path.exists():
                _save_png(path, im, meta)
        tracker.update(len(chunk))


def generate_pairs(
    model: SDModel,
    subjects: list[SubjectImage],
    class_prompt: str,
    *,
    size: int,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    batch_size: int = 4,
    cache_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> list[Image.Image]:
    """One positive class image per subject image, matched by the subject's name; cached."""
    key, spec = cache_key(model, class_prompt, size, steps, guidance, seed, "pairs")
    folder = Path(cache_dir or default_cache_dir()) / "pairs" / key
    paths = [folder / f"{s.name}.png" for s in subjects]
    jobs = [(p, name_seed(seed, s.name), {**spec, "subject": s.name}) for p, s in zip(paths, subjects)]
    _generate_missing(
        model, class_prompt, jobs, "pairs", size, steps, guidance, batch_size, progress, should_stop
    )
    return [_load_png(p) for p in paths]


def ensure_class_images(
    model: SDModel,
    class_prompt: str,
    count: int,
    *,
    size: int,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    batch_size: int = 4,
    class_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> list[Image.Image]:
    """``count`` class images: the user's own (``class_dir``) first, the missing ones generated and cached."""
    if count == 0:
        return []
    images: list[Image.Image] = []
    if class_dir:
        for p in find_images(class_dir)[:count]:
            images.append(center_square(open_image(p).convert("RGB"), size))
    missing = count - len(images)
    if missing <= 0:
        return images
    key, spec = cache_key(model, class_prompt, size, steps, guidance, seed, "class")
    folder = Path(cache_dir or default_cache_dir()) / "class" / key
    # whole batches (the last one padded with the next indices, kept for a later, larger count): image i
    # is the same whichever counts were asked before (8 anchor images, then 50 class images of one prompt)
    paths = [folder / f"{i:04d}.png" for i in range(-(-missing // batch_size) * batch_size)]
    jobs = [(p, name_seed(seed, f"class-{i}"), {**spec, "index": i}) for i, p in enumerate(paths)]
    _generate_missing(
        model, class_prompt, jobs, "class_images", size, steps, guidance, batch_size, progress, should_stop
    )
    return images + [_load_png(p) for p in paths[:missing]]


@dataclass
class PairSet:
    """The generated images of a run, made before protection (hosts preview them, protect reuses them).

    ``config`` holds the settings they were generated with (class prompt, seed, resolution,
    sampler, number of class images, cache folder); a ``protect`` run with the same settings
    and the same base model finds every image in the cache instead of generating it again.
    """

    config: ProtectConfig
    subjects: list[SubjectImage]
    positives: list[Image.Image]  # positives[i] pairs with subjects[i]
    class_images: list[Image.Image]
    model_fingerprint: str
    size: int


def prepare_pairs(
    config: ProtectConfig,
    model: SDModel,
    images=None,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> PairSet:
    """Generate (or load from the cache) the positives and class images ``protect(config)`` will use.

    ``images`` is what ``protect`` accepts (a folder, files or PIL images; default
    ``config.images``); the subjects are loaded at the training resolution exactly as
    ``protect`` loads them, so the cache keys agree.
    """
    config.validate()
    model.to(resolve_device(config.device))
    size = config.resolution or model.native_resolution
    source = images if images is not None else config.images
    subjects = load_subject_images(
        source, size, order=config.pair_order, min_side=None if size >= 256 else size
    )
    positives, class_images = generate_fixed_images(config, model, subjects, size, progress, should_stop)
    return PairSet(config, subjects, positives, class_images, model.fingerprint(), size)


def generation_kwargs(config, size: int, progress=None, should_stop=None) -> dict:
    """How a protection's images are generated with the base model (and where they are cached)."""
    return {"size": size, "seed": config.seed, "steps": config.sample_steps, "guidance": config.guidance_scale,
            "batch_size": config.sample_batch_size, "cache_dir": config.cache_dir or None, "progress": progress,
            "should_stop": should_stop}  # fmt: skip


def generate_fixed_images(
    config: ProtectConfig,
    model: SDModel,
    subjects: list[SubjectImage],
    size: int,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> tuple[list[Image.Image], list[Image.Image]]:
    """The positives (``positives[i]`` pairs with ``subjects[i]``) and the prior class images of
    ``config`` (none when ``prior_weight`` is 0), generated with the base model or read from the cache."""
    gen = generation_kwargs(config, size, progress, should_stop)
    positives = generate_pairs(model, subjects, config.class_prompt, **gen)
    class_images = []
    if config.prior_weight > 0:
        class_images = ensure_class_images(
            model, config.class_prompt, config.num_class_images, class_dir=config.class_images or None, **gen
        )
    return positives, class_images


def generate_anchor_images(
    config: ProtectConfig,
    model: SDModel,
    size: int,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> list[tuple[str, list[Image.Image]]]:
    """(prompt, images) for the class prompt, then each other anchor prompt of ``config`` (and the empty
    prompt with ``anchor_unconditional``), generated with the base model or read from the cache (the
    class prompt's are the first class images); empty when ``anchor_weight`` is 0."""
    if config.anchor_weight <= 0:
        return []
    unconditional = [""] if config.anchor_unconditional else []
    prompts = list(dict.fromkeys([config.class_prompt, *config.anchor_prompts, *unconditional]))
    gen = generation_kwargs(config, size, progress, should_stop)
    return [(p, ensure_class_images(model, p, config.num_anchor_images, **gen)) for p in prompts]
