"""``protect_images``: load, run an image-level method with progress/cancel/resume, write the PNGs."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import PATH_FIELDS
from ..data import load_subject_images
from ..driver import RunDriver, RunKind, check_flags, check_run_files, source_paths
from ..errors import Cancelled, InputError
from ..fileio import atomic_path, check_target
from ..loading import load_model
from ..models import SDModel, pil_to_tensor, resolve_device
from ..pairs import ensure_class_images
from ..progress import ProgressCallback, StopCheck, Tracker
from ..training import Diffusion, LatentBank, make_forward
from .base import ImageTask
from .config import METHODS, ImageProtectConfig

log = logging.getLogger(__name__)

STATE_VERSION = 1
RECORD_FILE = "apdm_images.json"
IMAGES_RUN = RunKind("image protection", ".apdm-images-state.pt", "images-state", STATE_VERSION, "steps")


def get_image_method(name: str):
    from ..registry import resolve

    return resolve(METHODS, name, "image protection method")


@dataclass
class ImageProtectResult:
    images: list[Image.Image]  # the protected photos (8-bit, within the budget)
    names: list[str]
    config: ImageProtectConfig
    steps_done: int
    cancelled: bool = False
    metrics: list[dict] = field(default_factory=list)  # per photo: psnr, ssim, max_change (8-bit levels)
    history: list[dict] = field(default_factory=list)
    output: Path | None = None
    state_path: Path | None = None
    seconds: float = 0.0  # wall-clock
    cpu_seconds: float = 0.0  # this process's CPU time (all its threads)


def quantize(protected: torch.Tensor, originals: list[Image.Image], levels: int) -> list[Image.Image]:
    """8-bit images whose every channel differs from the original by at most ``levels``."""
    out = []
    for x, orig in zip(protected.detach().float().cpu(), originals):
        base = np.asarray(orig.convert("RGB"), dtype=np.int16)
        want = np.rint((x.clamp(-1, 1).permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.int16)
        delta = np.clip(want - base, -levels, levels)
        out.append(Image.fromarray(np.clip(base + delta, 0, 255).astype(np.uint8)))
    return out


def image_metrics(protected: list[Image.Image], originals: list[Image.Image]) -> list[dict]:
    """PSNR and SSIM (scikit-image) and the largest channel change of each protected photo."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rows = []
    for p, o in zip(protected, originals):
        a, b = np.asarray(o.convert("RGB")), np.asarray(p.convert("RGB"))
        same = np.array_equal(a, b)
        win = min(7, min(a.shape[:2]) // 2 * 2 - 1)
        rows.append(
            {
                "psnr": float("inf") if same else float(peak_signal_noise_ratio(a, b, data_range=255)),
                "ssim": float(structural_similarity(a, b, channel_axis=2, data_range=255, win_size=win)),
                "max_change": int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()),
            }
        )
    return rows


def write_images(
    result: ImageProtectResult, output: str | Path, overwrite: bool = False, protected: tuple[Path, ...] = ()
) -> Path:
    """The protected photos as lossless PNGs with their names, and the record, in a new folder (atomically)."""
    output = Path(output)
    with atomic_path(output, overwrite=overwrite, protected=protected) as tmp:
        tmp.mkdir()
        for name, im in zip(result.names, result.images):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            (tmp / f"{name}.png").write_bytes(buf.getvalue())
        record = {
            "method": result.config.method,
            "budget": result.config.budget,
            "budget_levels": result.config.budget_levels,
            "steps": result.steps_done,
            "images": [{"name": n, **m} for n, m in zip(result.names, result.metrics)],
            "config": {k: v for k, v in result.config.to_dict().items() if k not in PATH_FIELDS},
        }
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return output


def class_image_bank(config: ImageProtectConfig, model: SDModel, size: int, progress, should_stop):
    """ASPL's surrogate prior-preservation images (generated once, cached) as a latent bank, else None."""
    if not (config.method == "aspl" and config.prior_weight > 0 and config.num_class_images > 0):
        return None
    class_images = ensure_class_images(
        model,
        config.class_prompt,
        config.num_class_images,
        size=size,
        seed=config.seed,
        steps=config.sample_steps,
        guidance=config.guidance_scale,
        batch_size=config.sample_batch_size,
        class_dir=config.class_images or None,
        cache_dir=config.cache_dir or None,
        progress=progress,
        should_stop=should_stop,
    )
    return LatentBank(*model.encode_images(class_images))


def make_task(config: ImageProtectConfig, model: SDModel, originals, prior, device) -> ImageTask:
    """The run's inputs on the compute device: the photos as pixels, the prompts, the random stream."""
    embeds = model.encode_prompts(
        [config.instance_prompt, config.class_prompt], size=config.resolution or None
    )
    x0 = pil_to_tensor(originals).to(device, next(model.vae.parameters()).dtype)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    forward = make_forward(device, config.mixed_precision)
    return ImageTask(config, model, x0, embeds[:1], embeds[1:2], Diffusion(model.noise_scheduler()), prior,
                     generator, forward)  # fmt: skip


@contextlib.contextmanager
def gradients_to_the_pixels_only(model: SDModel):
    """The VAE frozen for the run (gradients flow to the pixels); the caller's flags restored afterwards."""
    modules = (model.unet, model.vae)
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    model.vae.requires_grad_(False)
    try:
        yield
    finally:
        for m, saved in zip(modules, flags):
            for p, flag in zip(m.parameters(), saved):
                p.requires_grad_(flag)


def iterate(method, task: ImageTask, run: RunDriver, progress, should_stop):
    """The method's iterations from a saved state (if resumed) to ``steps`` -> (cancelled, state())."""
    config = task.cfg
    saved = run.load()
    if saved is not None:
        method.load_state_dict(saved)
        task.generator.set_state(saved["rng"])
        log.info(
            "Resumed the %s image protection from %s at step %d",
            config.method,
            run.state_path,
            method.step_count,
        )
    tracker = Tracker("protect_images", config.steps, progress, should_stop, start=method.step_count)
    phase = ["idle"]

    def state() -> dict | None:  # None inside an iteration: its changes are half made
        return None if phase[0] == "step" else {**method.state_dict(), "rng": task.generator.get_state()}

    def step() -> None:
        phase[0] = "step"
        entry = method.step()
        phase[0] = "idle"
        tracker.update(losses={k: v for k, v in entry.items() if k != "step"}, message=config.method)

    cancelled = run.loop(
        step,
        lambda: method.step_count,
        config.steps,
        tracker=tracker,
        state=state,
        save_every=config.save_every,
    )
    return cancelled, state


def protect_images(
    config: ImageProtectConfig,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    *,
    model: SDModel | None = None,
    images=None,
    resume: bool = False,
    overwrite: bool = False,
    restart: bool = False,
) -> ImageProtectResult:
    """Protect the photos ``config.images`` (or ``images``: PIL images) against personalization.

    The photos are center-cropped to the working resolution; the result holds 8-bit images that
    differ from those crops by at most ``budget`` in every channel. With ``config.output`` they are
    written as PNGs of the same names into a new folder (never over or into the inputs). Progress,
    cancel and resume as ``protect``: a stop saves the state between iterations, ``resume=True``
    continues it; an existing state needs ``resume`` or ``restart``.
    """
    config.validate()
    if config.budget_levels < 1:
        raise InputError(
            f"budget={config.budget:.5f} is below one 8-bit level (1/255): nothing could change."
        )
    check_flags(resume, restart)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    inputs = source_paths(
        model=[config.model, getattr(model, "source", None) or ""],
        photos=config.images if images is None else images,
        class_images=config.class_images,
    )
    check_run_files(config.output, config.state_path, config.cache_dir, inputs)
    if config.output:
        check_target(Path(config.output), overwrite, tuple(p for _, p in inputs))
    device = resolve_device(config.device)
    model = load_model(config.model, device=device, model_type=config.model_type) if model is None else model
    model.to(device)
    size = config.resolution or model.native_resolution
    source = images if images is not None else config.images
    subjects = load_subject_images(source, size, min_side=None if size >= 256 else size)
    originals = [s.image for s in subjects]
    skip = {"steps", "save_every", "device", "output", "state_path", "cache_dir", "model", "images"}
    identity = {k: v for k, v in config.to_dict().items() if k not in skip}
    run = RunDriver.open(
        IMAGES_RUN, config, identity, model, subjects, inputs, resume=resume, restart=restart
    )
    photo_bytes = 4 * size * size * max(len(subjects), 1)
    run.preflight(config.output, 2 * photo_bytes, 8 * photo_bytes)
    with torch.inference_mode(False), torch.enable_grad():
        try:
            prior = class_image_bank(config, model, size, progress, should_stop)
        except Cancelled:
            return ImageProtectResult(originals, [s.name for s in subjects], config, 0, cancelled=True)
        task = make_task(config, model, originals, prior, device)
        with gradients_to_the_pixels_only(model):
            method = get_image_method(config.method)(task)
            cancelled, state = iterate(method, task, run, progress, should_stop)
            protected = quantize(method.current(), originals, config.budget_levels)
    result = ImageProtectResult(
        protected,
        [s.name for s in subjects],
        config,
        method.step_count,
        cancelled,
        image_metrics(protected, originals),
        method.history,
        state_path=run.state_path if cancelled else None,
    )
    if not cancelled:

        def write():
            if config.output:
                return write_images(result, config.output, overwrite, protected=tuple(p for _, p in inputs))

        result.output = run.finish(write, state)
    result.seconds, result.cpu_seconds = time.perf_counter() - t_start, time.process_time() - cpu_start
    return result
