"""``protect()``: the public entry point of a model-level protection run.

Loads the model and the photos, checks every path and the state file (``driver.RunDriver``),
prepares the data (``l2p.prepare_data``), runs the method's Learning to Protect loop
(``l2p.L2PTrainer``) with progress, cancel and resume, and writes the protected model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import RUN_IDENTITY_EXCLUDE, ProtectConfig
from .data import load_subject_images
from .driver import (
    RunDriver,
    RunKind,
    check_flags,
    check_run_files,
    module_bytes,
    source_paths,
)
from .errors import Cancelled, InputError
from .l2p import STATE_VERSION, L2PTrainer, check_parallel, prepare_subjects
from .loading import load_model
from .methods import inactive_settings
from .models import SDModel, resolve_device
from .parallel import setup_parallel
from .progress import ProgressCallback, StopCheck, Tracker

log = logging.getLogger(__name__)

PROTECTION = RunKind("protection", ".apdm-state.pt", "state", STATE_VERSION, "outer_steps")


@dataclass
class ProtectResult:
    model: SDModel  # the base components with the protected UNet
    config: ProtectConfig
    steps_done: int
    cancelled: bool = False
    history: list[dict] = field(default_factory=list)
    state_path: Path | None = None
    output: Path | None = None
    seconds: float = 0.0  # wall-clock
    cpu_seconds: float = 0.0  # this process's CPU time (all its threads, not a GPU's): load-independent
    processes: int = 1  # > 1 under accelerate launch / torchrun
    distributed: str = "no"  # how those processes shared the work: 'ddp' or 'fsdp'


def identity_settings(config: ProtectConfig, reference: SDModel | None = None) -> dict:
    """The settings that determine the trajectory: all but the number of outer steps, how it runs, and the
    settings of the methods not run (a PersGuard field does not change an APDM run)."""
    skip = RUN_IDENTITY_EXCLUDE | inactive_settings(config.method) | {"model", "images"}
    settings = {k: v for k, v in config.to_dict().items() if k not in skip}
    if settings.get("subjects"):  # the subjects' prompts; their photos enter the identity by content
        settings["subjects"] = [{k: v for k, v in s.items() if k in ("instance_prompt", "class_prompt")}
                                for s in settings["subjects"]]  # fmt: skip
    else:
        settings.pop("subjects", None)  # (runs before multi-subject runs existed keep their identity)
    # (likewise runs before these settings existed keep their identity while they are off)
    for name in (
        "reference_model",
        "anchor_unconditional",
        "inner_batch_sizes",
        "interleave_subjects",
        "conflict_weight",
        "trap_weight",
        "tail_average",
        "hypergradient",
        "protect_beta1",
        "sam_radius",
    ):
        if not settings.get(name):
            settings.pop(name, None)
    if settings.get("sam_weights") == "all":  # its default, or sam_radius off
        settings.pop("sam_weights")
    if reference is not None:  # by content (a preloaded one has no path)
        settings["reference_model"] = reference.fingerprint()
    return settings


def protect(
    config: ProtectConfig,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    *,
    model: SDModel | None = None,
    images=None,
    subject_images=None,
    reference: SDModel | None = None,
    resume: bool = False,
    keep_state: bool = False,
    overwrite: bool = False,
    restart: bool = False,
) -> ProtectResult:
    """Protect ``config.model`` against personalization of the subject in ``config.images`` (and of
    each of ``config.subjects``: one run protects them all, the episodes taking them in turn).

    ``model``/``images`` (and ``subject_images``: one list per entry of ``config.subjects``) may be
    passed preloaded (hosts do); the input model is never
    modified: the result holds a new protected UNet beside the original components. ``reference``
    (preloaded ``config.reference_model``): the original model a protected ``model`` came from; the
    anchor, the targets and the generated images come from it (a subject added to a protected model).
    ``progress`` receives a ProgressEvent every inner step; ``should_stop`` is checked every
    inner step and stops the run within one step, saving the resumable state first
    (``result.cancelled``; call again with ``resume=True`` to continue). Any other exception
    from a host (an interrupt raised inside ``progress``) also saves the state, then propagates.
    With ``config.output`` set, the protected model is written there (atomically).
    A state file of an earlier, interrupted run is never ignored: without ``resume`` (continue
    it) or ``restart`` (start over and replace it) the call refuses with an InputError. On Ctrl-C
    the state is saved and the KeyboardInterrupt carries its path as ``state_path``.
    """
    flags = {"resume": resume, "keep_state": keep_state, "overwrite": overwrite, "restart": restart,
             "subject_images": subject_images, "reference": reference}  # fmt: skip
    if model is None and reference is None:
        return _protect(config, progress, should_stop, None, images, **flags)
    saved = ModelState(model) if model is not None else None
    saved_reference = ModelState(reference) if reference is not None else None
    done = False
    try:
        result = _protect(config, progress, should_stop, model, images, **flags)
        done = not result.cancelled
        return result
    finally:  # the caller's models as they were (a finished run's result shares its VAE and text encoder)
        if saved is not None:
            saved.restore(devices_of_shared=not done)
        if saved_reference is not None:
            saved_reference.restore()


class ModelState:
    """Devices, requires_grad flags and train/eval modes of a model's modules, to put back later."""

    def __init__(self, model: SDModel) -> None:
        self.modules = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder}
        if model.text_encoder_2 is not None:  # SDXL
            self.modules["text_encoder_2"] = model.text_encoder_2
        self.devices = {k: _device_of(m) for k, m in self.modules.items()}
        self.grads = {k: [p.requires_grad for p in m.parameters()] for k, m in self.modules.items()}
        self.modes = {k: [sub.training for sub in m.modules()] for k, m in self.modules.items()}

    def restore(self, devices_of_shared: bool = True) -> None:
        for k, m in self.modules.items():
            if self.devices[k] is not None and (k == "unet" or devices_of_shared):
                m.to(self.devices[k])
            for p, flag in zip(m.parameters(), self.grads[k]):
                p.requires_grad_(flag)
            for sub, mode in zip(m.modules(), self.modes[k]):
                sub.training = mode


def _device_of(module) -> torch.device | None:
    return next((p.device for p in module.parameters()), None)


def _protect(
    config: ProtectConfig,
    progress,
    should_stop,
    model: SDModel | None,
    images,
    *,
    resume: bool,
    keep_state: bool,
    overwrite: bool,
    restart: bool,
    subject_images=None,
    reference: SDModel | None = None,
) -> ProtectResult:
    """protect() without the care for a preloaded model's state."""
    config.validate()
    check_flags(resume, restart)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    inputs = input_paths(config, images, model)
    check_run_files(config.output, config.state_path, config.cache_dir, inputs)
    device = resolve_device(config.device)
    parallel = setup_parallel(config, device.type)  # accelerate, when launched with several processes
    if parallel.active:
        device = parallel.device if parallel.device.type != "cpu" else torch.device("cpu")
        progress = progress if parallel.is_main else None
    if model is None:  # a diffusers folder, or a single file of type config.model_type
        model = load_model(config.model, device=device, model_type=config.model_type)
    else:
        model.to(device)
    reference = reference_model(config, model, reference, device)
    if config.output:  # fail before hours of training, not after
        check_output(config.output, overwrite, model, tuple(p for _, p in inputs))
    size = config.resolution or model.native_resolution
    specs = config.all_subjects(images, subject_images)
    subject_sets = [load_subject_images(list(spec.images), size, order=config.pair_order,
                                        min_side=None if size >= 256 else size) for spec in specs]  # fmt: skip
    subjects = [s for group in subject_sets for s in group]  # every subject's photos (identity, export)
    source = images if images is not None and len(specs) == 1 else (config.images if len(specs) == 1 else
                                                                     [s.image for s in subjects])  # fmt: skip
    check_parallel(config, parallel)  # before any pairs are made
    run = RunDriver.open(PROTECTION, config, identity_settings(config, reference), model, subjects, inputs, resume=resume,
                         restart=restart, writer=parallel.is_main)  # fmt: skip
    state_unets = 6 if config.resync_every > 1 else 3  # theta + AdamW moments (+ the persistent attacker's)
    run.preflight(config.output, module_bytes(model.unet, model.vae, model.text_encoder),
                  state_unets * module_bytes(model.unet))  # fmt: skip
    with torch.inference_mode(False), torch.enable_grad():
        try:
            with parallel.main_first():  # the main process fills the pair cache, the others read it
                data = prepare_subjects(config, reference or model, subject_sets, size, progress, should_stop)
        except Cancelled:
            return ProtectResult(model, config, 0, cancelled=True, seconds=time.perf_counter() - t_start,
                                 cpu_seconds=time.process_time() - cpu_start)  # fmt: skip
        if device.type == "cuda":  # the frozen encoders are done: free their memory
            for m in {m for r in (model, reference) if r is not None for m in (r.vae, *r.text_encoders)}:
                m.to("cpu")
            torch.cuda.empty_cache()
        trainer = L2PTrainer(config, model, data, device, parallel, reference=reference)
        cancelled = train(trainer, run, progress, should_stop)
        protected = result_model(model, trainer.finish())
    result = ProtectResult(
        protected, config, trainer.step, cancelled, trainer.history, run.state_path if cancelled else None
    )
    if not cancelled and parallel.is_main:  # one process writes

        def write():
            if config.output:
                paths = tuple(p for _, p in inputs)
                return write_output(
                    protected, config, config.output, overwrite, subjects=source, inputs=paths
                )

        result.output = run.finish(write, trainer.state_dict, keep_state)
        result.state_path = run.state_path if keep_state else None
    parallel.wait()
    result.processes, result.distributed = parallel.world_size, parallel.kind
    result.seconds, result.cpu_seconds = time.perf_counter() - t_start, time.process_time() - cpu_start
    return result


def train(trainer: L2PTrainer, run: RunDriver, progress, should_stop) -> bool:
    """The outer steps from where the state file left them (if resumed) to outer_steps; True if stopped.

    On a stop (Cancelled, Ctrl-C, a host interrupt from the progress callback) theta and the outer
    optimizer are untouched mid-step: they are saved with the RNG state of the interrupted step's
    start, so a resumed run redoes that step exactly."""
    config, parallel = trainer.cfg, trainer.parallel
    saved = run.load()
    if saved is not None:
        trainer.load_state_dict(saved)
        log.info("Resumed from %s at outer step %d", run.state_path, trainer.step)
    per_outer = max(config.inner_steps, 1)
    stop = should_stop
    if parallel.active:  # every process stops at the same step when any was asked to
        stop = lambda: parallel.any_stop(bool(should_stop is not None and should_stop()))  # noqa: E731
    tracker = Tracker(
        "protect", config.outer_steps * per_outer, progress, stop, start=trainer.step * per_outer
    )
    return run.loop(
        lambda: trainer.outer_step(tracker),
        lambda: trainer.step,
        config.outer_steps,
        tracker=tracker,
        state=trainer.state_dict,
        state_interrupted=lambda: trainer.state_dict(at_step_start=True),
        save_every=config.save_every,
    )


def result_model(model: SDModel, unet) -> SDModel:
    """The base model's components with ``unet`` in place of the original (which stays intact)."""
    unet = unet.requires_grad_(False).eval()
    device = next(unet.parameters()).device
    for m in (model.vae, *model.text_encoders):
        m.to(device)
    info = {**model.info, "protected": True}
    return dataclasses.replace(model, unet=unet, info=info, _fingerprint=None)


def reference_model(
    config: ProtectConfig, model: SDModel, reference: SDModel | None, device
) -> SDModel | None:
    """The original model of a protected ``model`` (``reference`` preloaded, or ``config.reference_model``
    loaded), checked to be of the same architecture; None without one."""
    if reference is None and not config.reference_model:
        return None
    where = config.reference_model or "the reference model"
    if reference is None:
        reference = load_model(config.reference_model, device=device, model_type=config.model_type)
    else:
        reference.to(device)

    def shape(m):  # the architecture (not where a config came from: keys with a leading underscore)
        return {k: v for k, v in dict(m.unet.config).items() if not k.startswith("_")}, m.is_xl

    if shape(reference) != shape(model):
        raise InputError(
            f"{where} is not the same architecture as {config.model or 'the model'} (UNet configs differ): "
            "reference_model must be the original checkpoint the protected model was made from."
        )
    return reference


def input_paths(config: ProtectConfig, images=None, model: SDModel | None = None) -> list[tuple[str, Path]]:
    """What a run reads (the model, the subject photos, class images, backdoor images): never written."""
    others = [p for s in config.all_subjects()[1:] for p in (*s.images, s.class_images)]
    return source_paths(
        model=[config.model, getattr(model, "source", None) or "", config.reference_model],
        photos=[*(config.images if images is None else images), *others],
        class_images=config.class_images,
        backdoor_images=config.backdoor_images,
    )


def check_output(output: str | Path, overwrite: bool, model: SDModel, inputs: tuple[Path, ...] = ()) -> None:
    """Raise InputError now if ``write_output`` could not write ``model`` to ``output`` later
    (an existing output without ``overwrite``, the input model itself, a single-file output
    that cannot be made from this source, ...)."""
    from .export import check_export

    check_export(model, output, overwrite, inputs=inputs)


def write_output(
    model: SDModel,
    config: ProtectConfig,
    output: str | Path,
    overwrite: bool = False,
    subjects=None,
    inputs: tuple[Path, ...] = (),
) -> Path:
    """Write the protected model: a diffusers folder, or a single .safetensors file (export module).

    ``subjects``: the protected subject images (a folder, files or PIL images; default
    ``config.images``), recorded as salted hashes beside the settings.
    """
    from .export import write_model

    return write_model(model, output, config=config, overwrite=overwrite, subjects=subjects, inputs=inputs)
