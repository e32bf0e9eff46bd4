"""The shared machinery of every attack: registry, data, the training loop, state and resume.

An attack is a small class registered by name (like peft's tuners): it makes its trainable
copy of the model in ``__init__``, names the tensors it trains (``trainable``), and may
override ``loss``/``after_step``/``result_model``/``save``. The loop here is the same for all:
AdamW, gradient clipping, progress + cancel each step, a resumable state file.

The DreamBooth objective is ``apdm_core.training.dreambooth_loss``, the function the L2P
simulated attacker uses, so the simulated and the real attacker compute the same loss. With
augmentation the instance latents come from augmented views encoded every draw; all
randomness comes from one CPU ``torch.Generator`` whose state is saved with the weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import center_square, load_subject_images, random_view, view_is_fixed
from ..driver import (
    RunDriver,
    RunKind,
    check_flags,
    check_run_files,
    module_bytes,
    source_paths,
)
from ..errors import Cancelled, InputError, TrainingDiverged
from ..fileio import atomic_path, check_target
from ..models import SDModel, resolve_device
from ..pairs import ensure_class_images
from ..progress import ProgressCallback, StopCheck, Tracker
from ..training import Diffusion, LatentBank, dreambooth_loss, make_forward, uninterrupted
from .config import AttackConfig
from .registry import get_attack, register_attack, registered_attacks  # noqa: F401  (their home; re-exported)

log = logging.getLogger(__name__)

STATE_VERSION = 1
ATTACK_RUN = RunKind("attack", ".apdm-attack-state.pt", "attack-state", STATE_VERSION, "steps")


def replace_word(text: str, word: str, repl: str) -> str:
    """Replace ``word`` where it stands as a whole whitespace-separated word."""
    return re.sub(rf"(?<!\S){re.escape(word)}(?!\S)", lambda _: repl, text)


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
class AugmentedBank:
    """Subject photos drawn as fresh augmented views, encoded by the VAE on every draw.

    Same interface as ``training.LatentBank`` (``len``, ``draw``), so ``dreambooth_loss`` takes it.
    """

    def __init__(self, model: SDModel, images, size: int, crop: bool, crop_scale: float, flip: bool) -> None:
        self.model, self.images, self.size = model, list(images), size
        self.crop, self.crop_scale, self.flip = crop, crop_scale, flip

    def __len__(self) -> int:
        return len(self.images)

    def draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        views = [
            random_view(
                self.images[int(i)],
                self.size,
                generator,
                crop=self.crop,
                crop_scale=self.crop_scale,
                flip=self.flip,
            )
            for i in idx
        ]
        return LatentBank(*self.model.encode_images(views)).sample(torch.arange(batch_size), generator)


@dataclass
class AttackData:
    instance: LatentBank | AugmentedBank
    prior: LatentBank | None
    diffusion: Diffusion
    augmented: bool


def instance_bank(model: SDModel, originals, size: int, cfg: AttackConfig) -> tuple[object, bool]:
    """Augmented views when the augmentation can vary a view, else one fixed latent bank (same result, faster)."""
    varies = cfg.random_flip or (
        cfg.random_crop and not all(view_is_fixed(im, size, cfg.crop_scale) for im in originals)
    )
    if varies:
        return AugmentedBank(model, originals, size, cfg.random_crop, cfg.crop_scale, cfg.random_flip), True
    if cfg.crop_scale == 1:  # exactly the protection's preprocessing (data.center_square)
        views = [center_square(im, size) for im in originals]
    else:  # a fixed, centered zoom: draws no random numbers
        views = [random_view(im, size, None, crop=False, crop_scale=cfg.crop_scale) for im in originals]
    return LatentBank(*model.encode_images(views)), False


# ------------------------------------------------------------------------------------------
# attacks
# ------------------------------------------------------------------------------------------
class Attack:
    """Base class: a trainable copy of (part of) the model and the DreamBooth loss on it."""

    name = ""
    defaults: dict = {"steps": 800, "lr": 5e-6, "prior_weight": 1.0}

    def __init__(self, model: SDModel, cfg: AttackConfig, device: torch.device) -> None:
        self.model, self.cfg, self.device = model, cfg, device
        self.unet = model.unet  # subclasses replace it by a trainable copy where they train it
        self.forward = make_forward(device, cfg.mixed_precision)
        self._embeds: torch.Tensor | None = None

    # --- what is trained -------------------------------------------------------------------
    @property
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """name -> parameter of everything the optimizer updates (and the state file holds)."""
        raise NotImplementedError

    # --- the objective ----------------------------------------------------------------------
    def training_prompt(self) -> str:
        return self.cfg.instance_prompt

    def prompt_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(instance, class) prompt embeddings; fixed here, recomputed each step by attacks that train them."""
        if self._embeds is None:
            self._embeds = self.model.encode_prompts(
                [self.training_prompt(), self.cfg.class_prompt], size=self.cfg.resolution or None
            )
        return self._embeds[:1], self._embeds[1:]

    def loss(self, data: AttackData, generator: torch.Generator) -> torch.Tensor:
        inst, cls = self.prompt_embeds()
        c = self.cfg
        return dreambooth_loss(
            self.unet,
            self.forward,
            data.diffusion,
            data.instance,
            inst,
            generator,
            c.batch_size,
            data.prior,
            cls,
            c.prior_weight,
        )

    def after_step(self) -> None:
        """Hook after each optimizer step (textual inversion restores the rows it must not change)."""

    # --- the outcome ------------------------------------------------------------------------
    def prompt_map(self) -> dict[str, str]:
        """Words to replace in prompts for the attacked model (textual inversion: sks -> <sks>)."""
        return {}

    def result_view(self) -> SDModel:
        """The attacked model as it is now, sharing the training weights (nothing is frozen)."""
        info = {**self.model.info, "attack": self.name}
        return dataclasses.replace(self.model, unet=self.unet, info=info, _fingerprint=None)

    def result_model(self) -> SDModel:
        """The attacked model, frozen (the attack is over)."""
        own = (self.unet,) if self.unet is not self.model.unet else ()  # never the caller's modules
        for module in (*own, *self.extra_modules()):
            module.requires_grad_(False).eval()
        return self.result_view()

    def extra_modules(self) -> tuple[torch.nn.Module, ...]:
        """Trained modules besides the UNet (textual inversion: its text encoder)."""
        return ()

    def save(self, result: AttackResult, folder: Path) -> None:
        """Write the attack's result into ``folder`` (a fresh temporary folder)."""
        raise NotImplementedError

    @classmethod
    def load(cls, model: SDModel, folder: Path, cfg: AttackConfig) -> tuple[SDModel, dict[str, str]]:
        """Apply a result written by ``save`` to ``model`` (not modified) -> (attacked model, prompt_map)."""
        raise NotImplementedError


def frozen_copy_of_unet(model: SDModel, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """A private copy of the model's UNet (the input model object is never modified)."""
    unet = copy.deepcopy(model.unet).requires_grad_(False)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


# ------------------------------------------------------------------------------------------
# result
# ------------------------------------------------------------------------------------------
@dataclass
class AttackResult:
    model: SDModel  # the attacked model (new trainable copies; the input model is intact)
    config: AttackConfig  # resolved (the attack's defaults filled in)
    steps_done: int
    cancelled: bool = False
    history: list[dict] = field(default_factory=list)  # per step: step, loss, grad_norm, seconds
    state_path: Path | None = None
    seconds: float = 0.0
    prompt_map: dict[str, str] = field(default_factory=dict)
    output: Path | None = None  # where run_attack wrote the result (config.output)
    attack: Attack | None = field(default=None, repr=False)

    def prompt(self, text: str) -> str:
        """A prompt written with the identifier, in the attacked model's words (TI: its new token)."""
        for word, repl in self.prompt_map.items():
            text = replace_word(text, word, repl)
        return text

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]

    def save(self, output: str | Path, overwrite: bool = False, protected: tuple[Path, ...] = ()) -> Path:
        """Write the result as a new folder (atomically), with the config and the loss history beside it."""
        if self.cancelled or self.attack is None:
            raise InputError("This attack did not finish; resume it before saving its result.")
        output = Path(output)
        with atomic_path(output, overwrite=overwrite, protected=protected) as tmp:
            self.attack.save(self, tmp)
            (tmp / "apdm_attack_config.json").write_text(self.config.to_json(), encoding="utf-8")
            (tmp / "attack_history.json").write_text(json.dumps(self.history, indent=1), encoding="utf-8")
        return output


# ------------------------------------------------------------------------------------------
# state
# ------------------------------------------------------------------------------------------
class AttackTrainer:
    """AdamW on the attack's trainable tensors; one ``train_step`` = one DreamBooth step."""

    def __init__(self, attack: Attack, data: AttackData, cfg: AttackConfig) -> None:
        self.attack, self.data, self.cfg = attack, data, cfg
        self.params = list(attack.trainable.values())
        kw = {
            "lr": cfg.lr,
            "betas": (cfg.adam_beta1, cfg.adam_beta2),
            "weight_decay": cfg.adam_weight_decay,
            "eps": cfg.adam_epsilon,
        }
        if attack.device.type == "cuda":
            kw["foreach"] = True
        self.optimizer = torch.optim.AdamW(self.params, **kw)
        self.generator = torch.Generator("cpu").manual_seed(cfg.seed)
        self.step = 0
        self.history: list[dict] = []
        self.phase = "idle"  # "loss" (weights intact), "update" (optimizer stepping), "idle"
        self._rng_at_step_start = self.generator.get_state()

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        self._rng_at_step_start = self.generator.get_state()
        self.phase = "loss"
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.attack.loss(self.data, self.generator)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"The {self.attack.name} attack loss became {value} at step {self.step + 1}. Lower the attack "
                "learning rate (--lr) or keep mixed_precision='no'."
            )
        loss.backward()
        grad_norm = None
        if self.cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        with uninterrupted():  # the update and the step counter: one unit for the saver
            self.phase = "update"
            self.optimizer.step()
            self.attack.after_step()
            self.step += 1
            self.phase = "idle"
        entry = {
            "step": self.step,
            "loss": value,
            "grad_norm": grad_norm,
            "seconds": time.perf_counter() - t0,
        }
        self.history.append(entry)
        return entry

    def state_dict(self) -> dict:
        rng = self._rng_at_step_start if self.phase == "loss" else self.generator.get_state()
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "trainable": {k: v.detach().cpu().clone() for k, v in self.attack.trainable.items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, p in self.attack.trainable.items():
                p.copy_(state["trainable"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state["history"])


# ------------------------------------------------------------------------------------------
# the public entry point
# ------------------------------------------------------------------------------------------
def prepare_attack_data(
    model: SDModel, subjects, size: int, cfg: AttackConfig, progress, should_stop
) -> AttackData:
    prior = None
    if cfg.prior_weight > 0 and cfg.num_class_images > 0:
        class_images = ensure_class_images(
            model,
            cfg.class_prompt,
            cfg.num_class_images,
            size=size,
            seed=cfg.seed,
            steps=cfg.sample_steps,
            guidance=cfg.guidance_scale,
            batch_size=cfg.sample_batch_size,
            class_dir=cfg.class_images or None,
            cache_dir=cfg.cache_dir or None,
            progress=progress,
            should_stop=should_stop,
        )
        prior = LatentBank(*model.encode_images(class_images))
    instance, augmented = instance_bank(model, [s.image for s in subjects], size, cfg)
    return AttackData(instance, prior, Diffusion(model.noise_scheduler()), augmented)


def run_attack(
    model: SDModel,
    images,
    config: AttackConfig,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    resume: bool = False,
    state_path: str | Path | None = None,
    snapshot_steps=(),
    on_snapshot: Callable[[int, SDModel], None] | None = None,
    *,
    restart: bool = False,
    overwrite: bool = False,
) -> AttackResult:
    """Personalize ``model`` on the subject ``images`` the way an attacker would.

    ``images``: a folder, a list of files or PIL images. The input model object is never
    modified (each attack trains its own copy of what it changes). ``progress`` gets a
    ProgressEvent (stage 'attack') every step and ``should_stop`` is checked every step; a stop
    (or an exception raised by the host inside ``progress``) saves the resumable state first,
    and ``run_attack(..., resume=True)`` continues from it bit for bit. A saved state is never
    started over silently: without ``resume`` or ``restart`` (start over, replacing it) the call
    refuses. With ``config.output`` the result is written there at the end (``AttackResult.save``).

    ``on_snapshot(step, model)`` is called after each step listed in ``snapshot_steps`` with
    the attacked model as it is at that step (a view that shares the training weights: read
    it, sample from it under ``torch.no_grad``, do not keep it). One long attack then gives
    the whole attack-budget curve (the robustness curve of the efficacy benchmark). Step 0
    means the model before the first step.
    """
    config.validate()
    cfg = config.resolved()
    check_flags(resume, restart)
    t_start = time.perf_counter()
    inputs = source_paths(model=[cfg.model, model.source or ""], photos=images, class_images=cfg.class_images)
    state_path = str(state_path) if state_path else cfg.state_path
    check_run_files(cfg.output, state_path, cfg.cache_dir, inputs)
    if cfg.output:
        check_target(Path(cfg.output), overwrite, tuple(p for _, p in inputs))
    device = resolve_device(cfg.device)
    model.to(device)
    size = cfg.resolution or model.native_resolution
    subjects = load_subject_images(images, size, min_side=None if size >= 256 else size, crop=False)
    # hosts (ComfyUI) run code in inference mode: the attack's trainable copies must be made outside it
    with torch.inference_mode(False), torch.enable_grad():
        attack = get_attack(cfg.kind)(model, cfg, device)
        run = RunDriver.open(ATTACK_RUN, cfg, cfg.identity_dict(), model, subjects, inputs, state_path=state_path,
                             resume=resume, restart=restart)  # fmt: skip
        trained = module_bytes(
            *([attack.unet] if cfg.kind == "dreambooth" else [])
        )  # weights + AdamW moments
        run.preflight(cfg.output, module_bytes(model.unet, model.vae, model.text_encoder), 3 * trained)
        try:
            data = prepare_attack_data(model, subjects, size, cfg, progress, should_stop)
        except Cancelled:
            return AttackResult(model, cfg, 0, cancelled=True, seconds=time.perf_counter() - t_start)
        trainer = AttackTrainer(attack, data, cfg)
        cancelled = train(trainer, run, progress, should_stop, snapshot_steps, on_snapshot)
    result = AttackResult(
        attack.result_model(),
        cfg,
        trainer.step,
        cancelled,
        trainer.history,
        run.state_path if cancelled else None,
        prompt_map=attack.prompt_map(),
        attack=attack,
    )
    if not cancelled:
        write = (
            (lambda: result.save(cfg.output, overwrite, tuple(p for _, p in inputs)))
            if cfg.output
            else (lambda: None)
        )
        result.output = run.finish(write, trainer.state_dict)
    result.seconds = time.perf_counter() - t_start
    return result


def train(
    trainer: AttackTrainer, run: RunDriver, progress, should_stop, snapshot_steps=(), on_snapshot=None
) -> bool:
    """The attack's steps from where the state file left them (if resumed) to ``steps``, with the
    snapshots asked for; True if stopped."""
    cfg, attack = trainer.cfg, trainer.attack
    saved = run.load()
    if saved is not None:
        trainer.load_state_dict(saved)
        log.info("Resumed the %s attack from %s at step %d", cfg.kind, run.state_path, trainer.step)
    tracker = Tracker("attack", cfg.steps, progress, should_stop, start=trainer.step)
    snapshots = {int(s) for s in snapshot_steps} if on_snapshot is not None else set()

    def snapshot() -> None:
        if trainer.step in snapshots:
            take_snapshot(attack, trainer.step, on_snapshot)

    def step() -> None:
        entry = trainer.train_step()
        snapshot()
        tracker.update(losses={"loss": entry["loss"]}, message=cfg.kind)

    return run.loop(
        step,
        lambda: trainer.step,
        cfg.steps,
        tracker=tracker,
        save_every=cfg.save_every,
        state=lambda: None if trainer.phase == "update" else trainer.state_dict(),
        before=snapshot,
    )


def take_snapshot(attack: Attack, step: int, on_snapshot: Callable[[int, SDModel], None]) -> None:
    """Hand the attacked model at ``step`` to ``on_snapshot`` without touching the training state."""
    with torch.no_grad():
        on_snapshot(step, attack.result_view())


def load_attack_output(model: SDModel, folder: str | Path) -> tuple[SDModel, dict[str, str], AttackConfig]:
    """Rebuild an attacked model from ``model`` and a folder written by ``AttackResult.save``."""
    folder = Path(folder)
    cfg_path = folder / "apdm_attack_config.json"
    if not cfg_path.exists():
        raise InputError(
            f"{folder} has no apdm_attack_config.json; pass a folder written by `apdm attack --out`."
        )
    cfg = AttackConfig.load(cfg_path)
    attacked, prompt_map = get_attack(cfg.kind).load(model, folder, cfg)
    return attacked, prompt_map, cfg
