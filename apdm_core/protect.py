"""Learning to Protect (L2P) with the DPO loss: the APDM training loop.

Per outer step k (paper Algorithm 1, first order):

    theta' <- theta                                   (copy into a persistent buffer)
    fresh inner optimizer on theta'
    for j in 1..N_per:
        one DreamBooth step on theta' (instance + prior loss)        -> theta'_j
        g += grad_theta' [ L_dpo(theta'_j) + lambda * L_ppl(theta'_j) ]
    theta.grad <- g ; outer optimizer step on theta

``accumulation='protect+personalize'`` reproduces the released code, which never zeroes
the inner gradient before the protection backward, so each inner step adds
grad L_per(theta'_{j-1}) + grad L_protect(theta'_j). ``inner_steps=0`` is DPO without L2P
(the protection gradient is taken at theta itself).

Fixed images are encoded once (their VAE latent distributions are cached and re-sampled
every step) and the two prompts are embedded once; the text encoder and VAE are frozen.
All randomness comes from one CPU ``torch.Generator`` whose state is part of the resumable
state file, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import RUN_IDENTITY_EXCLUDE, ProtectConfig
from .data import load_subject_images
from .errors import Cancelled, InputError, TrainingDiverged
from .fileio import atomic_path
from .losses import dpo_loss, naive_adversarial_loss, noise_prediction_loss
from .models import SDModel, load_model, resolve_device
from .pairs import default_cache_dir, ensure_class_images, generate_pairs
from .progress import ProgressCallback, StopCheck, Tracker
from .training import Diffusion, LatentBank, NoisyBatch, dreambooth_loss, make_forward

log = logging.getLogger(__name__)

STATE_VERSION = 1


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
@dataclass
class ProtectionData:
    """Everything the loop samples from: latent banks and the two prompt embeddings."""

    subject: LatentBank  # x- (the subject; DPO negatives, DreamBooth instance images)
    positive: LatentBank  # x+ paired with subject[i] (same index)
    prior: LatentBank | None  # class images for prior preservation
    instance_embeds: torch.Tensor  # (1, L, D)
    class_embeds: torch.Tensor  # (1, L, D)
    diffusion: Diffusion  # forward diffusion with the model's training scheduler


# ------------------------------------------------------------------------------------------
# result
# ------------------------------------------------------------------------------------------
@dataclass
class ProtectResult:
    model: SDModel  # the base components with the protected UNet
    config: ProtectConfig
    steps_done: int
    cancelled: bool = False
    history: list[dict] = field(default_factory=list)
    state_path: Path | None = None
    output: Path | None = None
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------
class L2PTrainer:
    """Holds theta (trained), theta' (simulated attacker) and the frozen reference UNet."""

    def __init__(
        self, config: ProtectConfig, model: SDModel, data: ProtectionData, device: torch.device
    ) -> None:
        self.cfg, self.model, self.data, self.device = config, model, data, device
        self.ref_unet = model.unet  # the original weights, never modified
        self.ref_unet.requires_grad_(False).eval()
        self.unet = copy.deepcopy(model.unet).requires_grad_(True).train()  # theta
        self.unet_p = copy.deepcopy(model.unet).requires_grad_(True).train()  # theta'
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.params_p = [p for p in self.unet_p.parameters() if p.requires_grad]
        self.accum = [torch.zeros_like(p) for p in self.params]
        self.optimizer = self._adamw(self.params, config.lr_protect)
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        self.forward = make_forward(device, config.mixed_precision)
        self.step = 0
        self.history: list[dict] = []
        self._rng_at_step_start = self.generator.get_state()

    # --- helpers -----------------------------------------------------------------------------
    def _adamw(self, params, lr):
        c = self.cfg
        kw = {
            "lr": lr,
            "betas": (c.adam_beta1, c.adam_beta2),
            "weight_decay": c.adam_weight_decay,
            "eps": c.adam_epsilon,
        }
        if self.device.type == "cuda":
            kw["foreach"] = True
        return torch.optim.AdamW(params, **kw)

    @staticmethod
    def _check(value: torch.Tensor, what: str, where: str) -> float:
        v = float(value.detach())
        if not math.isfinite(v):
            raise TrainingDiverged(
                f"The {what} loss became {v} at {where}. Lower the learning rates (e.g. halve lr_protect and "
                "lr_personalize), keep mixed_precision='no', or check the images; resume from the last state file."
            )
        return v

    # --- the two paths -----------------------------------------------------------------------
    def personalization_loss(self, unet) -> torch.Tensor:
        """DreamBooth loss of the simulated attacker: instance term + lambda * prior term (one forward)."""
        d = self.data
        return dreambooth_loss(unet, self.forward, d.diffusion, d.subject, d.instance_embeds, self.generator,
                               self.cfg.batch_size, d.prior, d.class_embeds, self.cfg.prior_weight)  # fmt: skip

    def protection_loss(self, unet) -> tuple[torch.Tensor, dict[str, float]]:
        """DPO (or naive) loss plus lambda * prior preservation, at the current weights of ``unet``."""
        d, g, b, cfg = self.data, self.generator, self.cfg.batch_size, self.cfg
        use_prior = d.prior is not None and cfg.prior_weight > 0
        prior = d.diffusion.noisy(d.prior.draw(b, g), d.class_embeds, g) if use_prior else None
        if cfg.loss == "dpo":
            k = torch.randint(0, len(d.subject), (b,), generator=g)
            z_pos, z_neg = d.positive.sample(k, g), d.subject.sample(k, g)
            noise, t = d.diffusion.noise_and_timesteps(z_pos, g)  # the pair shares t and the noise
            pair = NoisyBatch.cat(
                d.diffusion.noisy(z_pos, d.instance_embeds, g, noise, t),
                d.diffusion.noisy(z_neg, d.instance_embeds, g, noise, t),
            )
            pred = self.forward(unet, NoisyBatch.cat(pair, prior) if use_prior else pair)
            with torch.no_grad():
                ref = self.forward(self.ref_unet, pair)
            err = (pred[: 2 * b].float() - pair.target.float()).pow(2)
            ref_err = (ref.float() - pair.target.float()).pow(2)
            loss, s = dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], cfg.beta, cfg.dpo_reduction)
            stats = {"dpo": float(loss.detach()), **{k2: float(v) for k2, v in s.items()}}
            if use_prior:
                prior_loss = noise_prediction_loss(pred[2 * b :], prior.target)
                stats["prior"] = float(prior_loss.detach())
                loss = loss + cfg.prior_weight * prior_loss
            return loss, stats
        # naive: -L_per + lambda * L_ppl
        inst = d.diffusion.noisy(d.subject.draw(b, g), d.instance_embeds, g)
        pred = self.forward(unet, NoisyBatch.cat(inst, prior) if use_prior else inst)
        per = noise_prediction_loss(pred[:b], inst.target)
        prior_loss = (
            noise_prediction_loss(pred[b:], prior.target) if use_prior else torch.zeros((), device=per.device)
        )
        loss = naive_adversarial_loss(per, prior_loss, cfg.naive_lambda)
        return loss, {"neg_per": float(-per.detach()), "prior": float(prior_loss.detach())}

    # --- one outer step ----------------------------------------------------------------------
    def outer_step(self, tracker: Tracker | None = None) -> dict:
        cfg = self.cfg
        self._rng_at_step_start = self.generator.get_state()
        t0 = time.perf_counter()
        with torch.no_grad():
            for p_prime, p in zip(self.params_p, self.params):
                p_prime.copy_(p)
            for a in self.accum:
                a.zero_()
        inner_opt = self._adamw(self.params_p, cfg.lr_personalize)
        where = f"outer step {self.step + 1}"
        per_losses, prot_losses, agg = [], [], {}

        def protect_grad(where_j: str) -> None:
            loss, stats = self.protection_loss(self.unet_p)
            prot_losses.append(self._check(loss, "protection", where_j))
            loss.backward()
            with torch.no_grad():
                for a, p in zip(self.accum, self.params_p):
                    if p.grad is not None:
                        a.add_(p.grad)
            for k2, v in stats.items():
                agg.setdefault(k2, []).append(v)

        if cfg.inner_steps == 0:
            inner_opt.zero_grad(set_to_none=True)
            protect_grad(where)
            if tracker is not None:
                tracker.update(losses={"protect": prot_losses[-1]}, outer=self.step + 1, inner=0)
        for j in range(cfg.inner_steps):
            where_j = f"{where}, inner step {j + 1}"
            inner_opt.zero_grad(set_to_none=True)
            loss_per = self.personalization_loss(self.unet_p)
            per_losses.append(self._check(loss_per, "personalization", where_j))
            loss_per.backward()
            inner_opt.step()
            if cfg.accumulation == "protect":
                inner_opt.zero_grad(set_to_none=True)
            protect_grad(where_j)
            if tracker is not None:
                tracker.update(
                    losses={"per": per_losses[-1], "protect": prot_losses[-1]},
                    outer=self.step + 1,
                    inner=j + 1,
                )
        # apply the accumulated protection gradient to theta
        for p, a in zip(self.params, self.accum):
            p.grad = a
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        del inner_opt
        self.step += 1
        entry = {
            "step": self.step,
            "loss_per": sum(per_losses) / len(per_losses) if per_losses else None,
            "loss_protect": sum(prot_losses) / len(prot_losses),
            **{k2: sum(v) / len(v) for k2, v in agg.items()},
            "seconds": time.perf_counter() - t0,
        }
        self.history.append(entry)
        return entry

    # --- state --------------------------------------------------------------------------------
    def state_dict(self, at_step_start: bool = False) -> dict:
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "unet": {k: v.detach().cpu() for k, v in self.unet.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": self._rng_at_step_start if at_step_start else self.generator.get_state(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        self.unet.load_state_dict(state["unet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["rng"])
        self._rng_at_step_start = self.generator.get_state()
        self.step = int(state["step"])
        self.history = list(state["history"])


# ------------------------------------------------------------------------------------------
# run identity, state files
# ------------------------------------------------------------------------------------------
def run_identity(config: ProtectConfig, model: SDModel, subjects) -> str:
    """Hash of everything that determines the trajectory (except the number of outer steps)."""
    h = hashlib.sha256()
    cfg = {
        k: v
        for k, v in config.to_dict().items()
        if k not in RUN_IDENTITY_EXCLUDE and k not in ("model", "images")
    }
    h.update(json.dumps(cfg, sort_keys=True).encode())
    h.update(model.fingerprint().encode())
    for s in subjects:
        h.update(s.name.encode())
        h.update(s.image.tobytes())
    return h.hexdigest()


def default_state_path(config: ProtectConfig, identity: str) -> Path:
    if config.state_path:
        return Path(config.state_path)
    if config.output:
        return Path(str(Path(config.output)) + ".apdm-state.pt")
    return Path(config.cache_dir or default_cache_dir()) / "state" / f"{identity[:20]}.pt"


def save_state(
    path: Path, trainer: L2PTrainer, config: ProtectConfig, identity: str, at_step_start: bool = False
) -> Path:
    state = trainer.state_dict(at_step_start)
    state["identity"] = identity
    state["config"] = config.to_dict()
    with atomic_path(path, overwrite=True) as tmp:
        torch.save(state, tmp)
    return path


def load_state(path: Path, identity: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"State file {path} cannot be read ({exc}); delete it to start over.") from exc
    if state.get("version") != STATE_VERSION or state.get("identity") != identity:
        raise InputError(
            f"State file {path} belongs to a different run (other model, images or settings). "
            "Resume with exactly the same settings (only outer_steps may grow), or delete the file to start over."
        )
    return state


# ------------------------------------------------------------------------------------------
# the public entry point
# ------------------------------------------------------------------------------------------
def prepare_data(
    config: ProtectConfig,
    model: SDModel,
    subjects,
    size: int,
    progress: ProgressCallback | None,
    should_stop: StopCheck | None,
) -> ProtectionData:
    """Generate/load positives and class images, then encode every fixed image and prompt once."""
    gen = {"size": size, "seed": config.seed, "steps": config.sample_steps, "guidance": config.guidance_scale,
           "batch_size": config.sample_batch_size, "cache_dir": config.cache_dir or None,
           "progress": progress, "should_stop": should_stop}  # fmt: skip
    positives = generate_pairs(model, subjects, config.class_prompt, **gen)
    if config.pair_order == "listdir":  # the released code pairs two unsorted directory listings:
        # emulate that arbitrary (but here reproducible) pairing with a name-keyed permutation
        order = sorted(
            range(len(positives)), key=lambda i: zlib.crc32(f"{config.seed}:{subjects[i].name}".encode())
        )
        positives = [positives[i] for i in order]
    class_images = []
    if config.prior_weight > 0:
        class_images = ensure_class_images(
            model, config.class_prompt, config.num_class_images, class_dir=config.class_images or None, **gen
        )
    tracker = Tracker("encode", 3, progress, should_stop)
    subject = LatentBank(*model.encode_images([s.image for s in subjects]))
    positive = LatentBank(*model.encode_images(positives))
    tracker.update(message="images")
    prior = LatentBank(*model.encode_images(class_images)) if class_images else None
    tracker.update(message="class images")
    embeds = model.encode_prompts([config.instance_prompt, config.class_prompt])
    tracker.update(message="prompts")
    return ProtectionData(
        subject, positive, prior, embeds[:1], embeds[1:], Diffusion(model.noise_scheduler())
    )


def protect(
    config: ProtectConfig,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    *,
    model: SDModel | None = None,
    images=None,
    resume: bool = False,
    keep_state: bool = False,
    overwrite: bool = False,
) -> ProtectResult:
    """Protect ``config.model`` against personalization of the subject in ``config.images``.

    ``model``/``images`` may be passed preloaded (hosts do); the input model is never
    modified: the result holds a new protected UNet beside the original components.
    ``progress`` receives a ProgressEvent every inner step; ``should_stop`` is checked every
    inner step and stops the run within one step, saving the resumable state first
    (``result.cancelled``; call again with ``resume=True`` to continue). Any other exception
    from a host (an interrupt raised inside ``progress``) also saves the state, then propagates.
    With ``config.output`` set, the protected model is written there (atomically).
    """
    config.validate()
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    if model is None:
        model = load_model(config.model, device=device)
    else:
        model.to(device)
    if config.output:  # fail before hours of training, not after
        check_output(config.output, overwrite, model)
    size = config.resolution or model.native_resolution
    source = images if images is not None else config.images
    subjects = load_subject_images(
        source, size, order=config.pair_order, min_side=None if size >= 256 else size
    )
    with torch.inference_mode(False), torch.enable_grad():
        try:
            data = prepare_data(config, model, subjects, size, progress, should_stop)
        except Cancelled:
            return ProtectResult(model, config, 0, cancelled=True, seconds=time.perf_counter() - t_start)
        if device.type == "cuda":  # the frozen encoders are done: free their memory
            model.vae.to("cpu")
            model.text_encoder.to("cpu")
            torch.cuda.empty_cache()
        trainer = L2PTrainer(config, model, data, device)
        identity = run_identity(config, model, subjects)
        state_path = default_state_path(config, identity)
        if resume and state_path.exists():
            trainer.load_state_dict(load_state(state_path, identity))
            log.info("Resumed from %s at outer step %d", state_path, trainer.step)
        per_outer = max(config.inner_steps, 1)
        tracker = Tracker(
            "protect", config.outer_steps * per_outer, progress, should_stop, start=trainer.step * per_outer
        )
        cancelled = False
        try:
            tracker.check_stop()
            while trainer.step < config.outer_steps:
                trainer.outer_step(tracker)
                if (
                    config.save_every
                    and trainer.step % config.save_every == 0
                    and trainer.step < config.outer_steps
                ):
                    save_state(state_path, trainer, config, identity)
        except BaseException as exc:
            if isinstance(exc, TrainingDiverged):
                raise
            # Cancelled, Ctrl-C, or a host interrupt raised from the progress callback: theta and
            # the outer optimizer are untouched mid-step, so save them with the RNG state of the
            # interrupted step's start; a resumed run redoes that step exactly.
            save_state(state_path, trainer, config, identity, at_step_start=True)
            if not isinstance(exc, Cancelled):
                raise
            cancelled = True
        protected = result_model(model, trainer.unet)
    result = ProtectResult(
        protected, config, trainer.step, cancelled, trainer.history, state_path if cancelled else None
    )
    if not cancelled:
        if config.output:
            result.output = write_output(protected, config, config.output, overwrite=overwrite)
        if keep_state:
            result.state_path = save_state(state_path, trainer, config, identity)
        elif state_path.exists():
            state_path.unlink()
    result.seconds = time.perf_counter() - t_start
    return result


def result_model(model: SDModel, unet) -> SDModel:
    """The base model's components with ``unet`` in place of the original (which stays intact)."""
    unet = unet.requires_grad_(False).eval()
    device = next(unet.parameters()).device
    model.vae.to(device)
    model.text_encoder.to(device)
    info = {**model.info, "protected": True}
    return SDModel(
        unet, model.vae, model.text_encoder, model.tokenizer, model.scheduler, model.source, model.kind, info
    )


def check_output(output: str | Path, overwrite: bool, model: SDModel) -> None:
    from .fileio import check_target

    check_target(Path(output), overwrite, (Path(model.source),) if model.source else ())


def write_output(model: SDModel, config: ProtectConfig, output: str | Path, overwrite: bool = False) -> Path:
    """Write the protected model: a diffusers folder, or a single .safetensors file (export module)."""
    from .export import write_model

    return write_model(model, output, config=config, overwrite=overwrite)
