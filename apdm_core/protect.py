"""Learning to Protect (L2P): the simulated-attacker loop every model-level method trains with.

The method (``config.method``, ``apdm_core/methods/``) supplies the loss at the attacked weights
(APDM: DPO; PersGuard: backdoor retention) and any term at theta; the loop, the levers
(``apdm_core/levers.py``), state/resume and export are shared.

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
import logging
import math
import sys
import time
import types
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import RUN_IDENTITY_EXCLUDE, ProtectConfig
from .data import load_subject_images
from .driver import RunDriver, cache_folder, check_flags, module_bytes, preflight, source_paths
from .errors import Cancelled, InputError, TrainingDiverged
from .fileio import check_paths
from .levers import DTYPES, make_adamw, pin_parameters, protected_subset, require_bitsandbytes, use_xformers
from .loading import load_model
from .losses import noise_prediction_loss
from .methods import get_method
from .models import SDModel, resolve_device
from .pairs import generate_anchor_images, generate_fixed_images
from .parallel import Parallel, copy_into, full_tensor, setup_parallel
from .progress import ProgressCallback, StopCheck, Tracker
from .training import Diffusion, LatentBank, dreambooth_loss, make_forward, uninterrupted

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
    anchor: AnchorSet | None = None  # images the utility anchor keeps (anchor_weight > 0)
    # the instance prompt with each of extra_identifiers in place of its identifier: (K, L, D)
    identifier_embeds: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)  # what the protection method prepared (methods/*.prepare)


@dataclass
class AnchorSet:
    """Images of the anchor prompts (one latent bank per prompt) with their prompt embeddings.

    Bank 0 is the class prompt: the prompt the protection is most likely to disturb (it shares all
    but the identifier with the instance prompt), so it takes half of every anchor batch; the other
    half is one image of each of the other prompts (a random subset when there are more).
    """

    banks: list[LatentBank]
    embeds: torch.Tensor  # (prompts, L, D)

    def draw(self, count: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` latents (half of the class prompt, the rest one per other prompt) and their embeddings."""
        others = len(self.banks) - 1
        n_other = min(others, count // 2)
        pick = (torch.randperm(others, generator=g)[:n_other] + 1).tolist() if n_other else []
        which = [0] * (count - n_other) + pick
        latents = torch.cat(
            [self.banks[0].draw(count - n_other, g)] + [self.banks[i].draw(1, g) for i in pick]
        )
        return latents, self.embeds[torch.tensor(which, device=self.embeds.device)]


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
    processes: int = 1  # > 1 under accelerate launch / torchrun
    distributed: str = "no"  # how those processes shared the work: 'ddp' or 'fsdp'


# ------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------
class L2PTrainer:
    """Holds theta (trained), theta' (simulated attacker) and the frozen reference UNet.

    The performance levers of ``ProtectConfig`` (README "Performance") change where tensors
    live and which kernels run, never the losses or the order of random draws:

    - theta' is a persistent copy, refilled from theta at every outer step (no deepcopy);
    - the protection gradient is accumulated by letting the backward add straight into the
      accumulator (theta'.grad aliases it), with no separate gradient buffer;
    - ``optimizer_in_backward``: the attacker's AdamW steps each parameter as soon as its
      gradient is ready, then frees it (per-parameter AdamW is the same update);
    - ``offload_outer``: theta and the outer AdamW live in CPU memory;
    - ``ref_precision``, ``mixed_precision``, ``channels_last``, ``attention``,
      ``gradient_checkpointing``, ``compile_unet`` and ``adamw_impl`` pick kernels/precision;
    - ``parallel`` splits the batch over processes (DDP) or also shards the UNets (FSDP).
    """

    def __init__(
        self,
        config: ProtectConfig,
        model: SDModel,
        data: ProtectionData,
        device: torch.device,
        parallel: Parallel | None = None,
    ) -> None:
        self.cfg, self.model, self.data, self.device = config, model, data, device
        self.parallel = parallel or Parallel()
        distributed = self.parallel.active
        fsdp = distributed and self.parallel.kind == "fsdp"
        self.channels_last = config.channels_last and not fsdp
        if config.channels_last and fsdp:
            log.warning("channels_last is ignored with distributed='fsdp' (shards are row-major).")
        self.in_backward = config.optimizer_in_backward and not distributed
        if self.in_backward and not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
            raise InputError(
                f"optimizer_in_backward needs torch >= 2.2 (this is torch {torch.__version__}); "
                "turn it off (or use the 'fast' preset) or update torch."
            )
        if config.optimizer_in_backward and distributed:
            log.warning(
                "optimizer_in_backward is ignored with several processes (the library syncs gradients)."
            )
        # the backward adds the protection gradient straight into the accumulator, except where a
        # distributed wrapper owns .grad (DDP/FSDP write their averaged gradient there)
        self.alias_grads = not distributed
        self.persistent = config.resync_every > 1
        if distributed and (self.persistent or config.anchor_weight > 0):
            raise InputError(
                "resync_every > 1 and anchor_weight > 0 run in one process only; launch without accelerate."
            )
        if self.in_backward and config.inner_max_grad_norm > 0:
            raise InputError(
                "inner_max_grad_norm needs the whole gradient before the step; turn optimizer_in_backward off."
            )
        if config.anchor_weight > 0 and config.offload_outer:
            raise InputError("anchor_weight > 0 trains theta on the compute device; turn offload_outer off.")
        self.method = get_method(config.method)
        if self.method.uses_theta_loss(config) and (distributed or config.offload_outer):
            raise InputError(
                f"method={config.method!r} trains a term at theta on the compute device in one process "
                "(behaviour_weight > 0): turn offload_outer off and launch without accelerate."
            )
        self.inner_batch = config.inner_batch_size or config.batch_size
        if config.optimizer == "adamw8bit":
            require_bitsandbytes(device)
        self.outer_device = torch.device("cpu") if (config.offload_outer or fsdp) else device
        base = model.unet
        base.requires_grad_(False).eval()
        # theta: the protected weights, updated once per outer step (in CPU memory with offload_outer)
        self.unet = copy.deepcopy(base).to(self.outer_device).requires_grad_(True).train()
        if self.channels_last:  # same layout as theta' so the accumulated gradient applies as is
            self.unet.to(memory_format=torch.channels_last)
        if self.outer_device.type == "cpu" and device.type == "cuda":
            pin_parameters(self.unet)  # faster copies theta -> theta' every outer step
        # theta': the simulated attacker, a persistent buffer on the compute device
        self.unet_p = self._prepare(copy.deepcopy(base).to(device), trained=True)
        # the frozen reference: the original weights (a copy when a lever would change the module)
        ref_dtype = DTYPES[config.ref_precision]
        self._base_device = None
        if ref_dtype == torch.float32 and not (self.channels_last or fsdp or config.compile_unet
                                               or config.attention != "sdpa"):  # fmt: skip
            self.ref_unet = base
        else:
            self.ref_unet = self._prepare(copy.deepcopy(base).to(device, ref_dtype), trained=False)
            if device.type == "cuda":  # the fp32 original is not needed on the GPU meanwhile
                self._base_device = device
                base.to("cpu")
                torch.cuda.empty_cache()
        self.run_p = self.parallel.wrap_trained(self.unet_p)  # DDP wrapper / sharded in place
        self.ref_unet = self.parallel.wrap_frozen(self.ref_unet)
        self.run_ref = self.ref_unet
        if config.compile_unet:
            self.run_p, self.run_ref = torch.compile(self.run_p), torch.compile(self.ref_unet)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.params_p = [p for p in self.unet_p.parameters() if p.requires_grad]
        self.accum = [torch.zeros_like(p) for p in self.params_p]
        self.protected_params = protected_subset(self.unet, config.protect_layers)
        self.optimizer = self._adamw(self.protected_params, config.lr_protect)
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        self.forward = make_forward(device, config.mixed_precision)
        self.forward_ref = make_forward(device, config.ref_precision if ref_dtype != torch.float32 else
                                        config.mixed_precision)  # fmt: skip
        self.step = 0
        self.history: list[dict] = []
        self._rng_at_step_start = self.generator.get_state()
        self._grad_buffers: list[torch.Tensor] | None = None
        self._inner: dict | None = None  # per-parameter inner optimizers (optimizer_in_backward)
        self._stepping = False
        self._add_to_accum = False
        self._alias_checked = False
        # the simulated attacker's episode (resync_every > 1: it outlives an outer step)
        self._episode: dict | None = None  # {"opt": inner optimizer, "lr": float, "h": attack steps done}
        self._episode_at_step_start: dict | None = None  # its state for a resume from the step's start
        if self.in_backward:
            self._accum_of = {p: a for p, a in zip(self.params_p, self.accum)}
            for p in self.params_p:
                p.register_post_accumulate_grad_hook(self._step_in_backward)

    # --- helpers -----------------------------------------------------------------------------
    def _prepare(self, unet, trained: bool):
        """Apply the kernel levers to a working copy (never to the input model)."""
        cfg = self.cfg
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
        if cfg.attention == "xformers":
            use_xformers(unet, self.device)
        if trained:
            unet.requires_grad_(True).train()
            if cfg.gradient_checkpointing:
                unet.enable_gradient_checkpointing()
        else:
            unet.requires_grad_(False).eval()
        return unet

    def _adamw(self, params, lr):
        return make_adamw(self.cfg, params, lr, self.device)

    def _new_inner_optimizer(self, lr: float | None = None):
        """A fresh attacker optimizer for theta' (one per parameter with optimizer_in_backward)."""
        lr = self.cfg.lr_personalize if lr is None else lr
        if self.in_backward:
            self._inner = {p: self._adamw([p], lr) for p in self.params_p}
            return None
        return self._adamw(self.params_p, lr)

    @property
    def instance_embeds(self) -> torch.Tensor:
        """The instance prompt of the current attacker episode (its identifier, with extra_identifiers)."""
        k = self._episode["identifier"] if self._episode is not None else 0
        if k == 0 or self.data.identifier_embeds is None:
            return self.data.instance_embeds
        return self.data.identifier_embeds[k - 1 : k]

    def _episode_identifier(self) -> int:
        """0 = the instance prompt's own identifier, k = extra_identifiers[k - 1] (drawn per episode)."""
        n = len(self.cfg.extra_identifiers)
        return int(torch.randint(0, n + 1, (), generator=self.generator)) if n else 0

    def _episode_lr(self) -> float:
        """The attacker's learning rate for a new episode: fixed, or log-uniform in the configured range."""
        lo, hi = self.cfg.lr_personalize, self.cfg.lr_personalize_max
        if hi <= lo:
            return lo
        u = float(torch.rand((), generator=self.generator))
        return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))

    def _step_in_backward(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook of theta' (optimizer_in_backward): step this parameter, free its grad."""
        if not self._stepping:
            return
        with torch.no_grad():
            if self._add_to_accum:
                self._accum_of[p].add_(p.grad)
            self._inner[p].step()
        p.grad = None

    def check_accumulation(self) -> None:
        """Once per run: the backward added into the accumulator in place (a torch that replaced
        ``.grad`` instead would leave the accumulator silently zero: a protection that does nothing)."""
        self._alias_checked = True
        replaced = [i for i, (p, a) in enumerate(zip(self.params_p, self.accum))
                    if p.grad is not None and p.grad.data_ptr() != a.data_ptr()]  # fmt: skip
        if replaced:
            raise RuntimeError(
                "The protection gradient did not reach the accumulator (torch replaced .grad instead of adding "
                f"into it, for {len(replaced)} tensors); please report this with your torch version "
                f"({torch.__version__})."
            )

    def _clear_grads(self) -> None:
        for p in self.params_p:
            p.grad = None

    def _check(self, value: torch.Tensor | float, what: str, where: str) -> float:
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
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
        return dreambooth_loss(unet, self.forward, d.diffusion, d.subject, self.instance_embeds, self.generator,
                               self.inner_batch, d.prior, d.class_embeds, self.cfg.prior_weight,
                               shard=self.parallel.shard(self.inner_batch))  # fmt: skip

    def protection_loss(self, unet) -> tuple[torch.Tensor, dict[str, float]]:
        """The method's protection loss at the current weights of ``unet`` (theta' after attack steps)."""
        return self.method.protection_loss(self, unet)

    # --- one outer step ----------------------------------------------------------------------
    def load_theta_into_prime(self) -> None:
        """theta' <- theta, in place (theta may live in CPU memory, theta' may be sharded)."""
        with torch.no_grad():
            for p_prime, p in zip(self.params_p, self.params):
                copy_into(p_prime, p)
            for a in self.accum:
                a.zero_()

    def apply_outer_update(self, protect_weight: float = 1.0) -> float | None:
        """theta.grad <- the accumulated protection gradient (+ the anchor's and the method's terms at
        theta); one outer optimizer step.

        With a persistent attacker the same change of theta is applied to theta', so theta' stays
        "theta after the attack steps of this episode". Returns the losses of the terms at theta.
        """
        if self._grad_buffers is None:  # theta's gradient: the accumulator itself when it lives with theta
            fsdp = self.parallel.active and self.parallel.kind == "fsdp"
            if not fsdp and all(a.device == p.device for a, p in zip(self.accum, self.params)):
                self._grad_buffers = self.accum
            else:
                pin = self.outer_device.type == "cpu" and self.device.type == "cuda"
                self._grad_buffers = [
                    torch.empty_like(p).pin_memory() if pin else torch.empty_like(p) for p in self.params
                ]
        with torch.no_grad():
            for buf, a, p in zip(self._grad_buffers, self.accum, self.params):
                if buf is not a:
                    buf.copy_(full_tensor(a))
                p.grad = buf
        stats = {}  # the terms at theta (relative to one protection term: scaled by the protection weights)
        if self.cfg.anchor_weight > 0 and self.data.anchor is not None:
            loss = self.anchor_loss()  # backward adds into theta.grad, the accumulated gradient
            (self.cfg.anchor_weight * max(protect_weight, 1.0) * loss).backward()
            stats["anchor"] = self._check(loss, "anchor", f"outer step {self.step + 1}")
        at_theta = self.method.theta_loss(self)
        if at_theta is not None:
            loss, method_stats = at_theta
            (max(protect_weight, 1.0) * loss).backward()
            self._check(loss, self.method.name, f"outer step {self.step + 1}")
            stats.update(method_stats)
        before = [p.detach().clone() for p in self.params] if self.persistent else None
        self.optimizer.step()
        for p in self.params:  # also the gradients of layers protect_layers leaves as they are
            p.grad = None
        if before is not None:
            with torch.no_grad():
                for p_prime, p, b in zip(self.params_p, self.params, before):
                    p_prime.add_((p - b).to(p_prime.device))
        return stats

    def anchor_loss(self) -> torch.Tensor:
        """Distillation of theta to the frozen original on noised anchor images with their prompts."""
        d, g = self.data, self.generator
        z0, embeds = d.anchor.draw(16, g)
        batch = d.diffusion.noisy(z0, embeds, g)
        pred = self.forward(self.unet, batch)
        with torch.no_grad():
            ref = self.forward_ref(self.run_ref, batch)
        return noise_prediction_loss(pred, ref)

    def _start_episode(self) -> None:
        """theta' <- theta and a fresh attacker optimizer (every outer step unless resync_every > 1)."""
        self.load_theta_into_prime()
        lr = self._episode_lr()
        self._episode = {"opt": self._new_inner_optimizer(lr), "lr": lr, "h": 0,
                         "identifier": self._episode_identifier()}  # fmt: skip

    def _protect_weight(self, h: int) -> float:
        """Weight of the protection gradient after attack step h of the episode (late_weighting)."""
        if not self.cfg.late_weighting:
            return 1.0
        horizon = self.cfg.resync_every * self.cfg.inner_steps
        return math.exp(self.cfg.late_weighting * (h - horizon))

    def outer_step(self, tracker: Tracker | None = None) -> dict:
        cfg = self.cfg
        self._rng_at_step_start = self.generator.get_state()
        t0 = time.perf_counter()
        if self._episode is None or self.step % cfg.resync_every == 0:
            self._start_episode()
        else:  # the persistent attacker continues where the last outer step left it
            for a in self.accum:
                a.zero_()
        if self.persistent:  # what a resume from this step's start needs
            self._episode_at_step_start = self.attacker_state()
        episode = self._episode
        inner_opt = episode["opt"]
        where = f"outer step {self.step + 1}"
        per_losses, prot_losses, agg = [], [], {}
        weights = [0.0]

        def protect_grad(where_j: str, weight: float = 1.0) -> None:
            loss, stats = self.protection_loss(self.run_p)
            logged = self.parallel.mean({"protect": float(loss.detach()), **stats})
            prot_losses.append(self._check(logged.pop("protect"), "protection", where_j))
            weighted = loss if weight == 1.0 else loss * weight
            weights[0] += weight
            if self.alias_grads:  # the backward adds into the accumulator itself
                for p, a in zip(self.params_p, self.accum):
                    p.grad = a
                weighted.backward()
                if not self._alias_checked:
                    self.check_accumulation()
                self._clear_grads()
            else:
                weighted.backward()
                with torch.no_grad():
                    for a, p in zip(self.accum, self.params_p):
                        if p.grad is not None:
                            a.add_(p.grad)
            for k2, v in logged.items():
                agg.setdefault(k2, []).append(v)

        add_per = cfg.accumulation == "protect+personalize"
        if cfg.inner_steps == 0:
            self._clear_grads()
            protect_grad(where)
            if tracker is not None:
                tracker.update(losses={"protect": prot_losses[-1]}, outer=self.step + 1, inner=0)
        for j in range(cfg.inner_steps):
            where_j = f"{where}, inner step {j + 1}"
            self._clear_grads()
            loss_per = self.personalization_loss(self.run_p)
            per_losses.append(
                self._check(
                    self.parallel.mean({"per": float(loss_per.detach())})["per"], "personalization", where_j
                )
            )
            if self.in_backward:  # each parameter steps (and adds to the accumulator) as its grad is ready
                self._stepping, self._add_to_accum = True, add_per
                try:
                    loss_per.backward()
                finally:
                    self._stepping = False
            else:
                loss_per.backward()
                if cfg.inner_max_grad_norm > 0:  # as the real attacker clips
                    torch.nn.utils.clip_grad_norm_(self.params_p, cfg.inner_max_grad_norm)
                inner_opt.step()
                if add_per:  # the released code keeps grad L_per(theta'_{j-1}) in the gradient
                    with torch.no_grad():
                        for a, p in zip(self.accum, self.params_p):
                            if p.grad is not None:
                                a.add_(p.grad)
            self._clear_grads()
            episode["h"] += 1
            if episode["h"] % cfg.protect_every == 0:
                protect_grad(where_j, self._protect_weight(episode["h"]))
            if tracker is not None:
                losses = {"per": per_losses[-1]}
                if prot_losses:
                    losses["protect"] = prot_losses[-1]
                tracker.update(losses=losses, outer=self.step + 1, inner=j + 1)
        with uninterrupted():  # theta's update and the step counter: one unit for the saver
            at_theta = self.apply_outer_update(weights[0])
            self.step += 1
            # from here on the current state IS the start of the next step
            self._rng_at_step_start = self.generator.get_state()
            self._episode_at_step_start = None
        for k2, v in at_theta.items():
            agg.setdefault(k2, []).append(v)
        if not self.persistent:
            self._episode = None
            del inner_opt
            self._inner = None
        entry = {
            "step": self.step,
            "loss_per": sum(per_losses) / len(per_losses) if per_losses else None,
            "loss_protect": sum(prot_losses) / len(prot_losses) if prot_losses else None,
            **{k2: sum(v) / len(v) for k2, v in agg.items()},
            "seconds": time.perf_counter() - t0,
        }
        if self.persistent or cfg.lr_personalize_max > cfg.lr_personalize:
            entry["attack_lr"] = episode["lr"]
        if cfg.extra_identifiers:
            entry["identifier"] = ([self.cfg.instance_prompt] + identifier_prompts(cfg))[
                episode["identifier"]
            ]
        self.history.append(entry)
        return entry

    def finish(self):
        """The protected UNet as a plain module on the compute device; the base model back where it was."""
        unet = self.unet.to(self.device, memory_format=torch.contiguous_format)
        if self._base_device is not None:
            self.model.unet.to(self._base_device)
        return unet

    # --- state --------------------------------------------------------------------------------
    def state_dict(self, at_step_start: bool = False) -> dict:
        state = {
            "version": STATE_VERSION,
            "step": self.step,
            "unet": {k: v.detach().cpu() for k, v in self.unet.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": self._rng_at_step_start if at_step_start else self.generator.get_state(),
            "history": self.history,
        }
        if self.persistent and self._episode is not None:  # the attacker lives on between outer steps
            start = self._episode_at_step_start if at_step_start else None
            state["attacker"] = start if start is not None else self.attacker_state()
        return state

    def attacker_state(self) -> dict:
        """theta', the attacker's optimizer state, lr and steps done in the episode (CPU copies)."""
        ep = self._episode
        if self.in_backward:
            opt = [copy.deepcopy(self._inner[p].state_dict()) for p in self.params_p]
        else:
            opt = copy.deepcopy(ep["opt"].state_dict())
        return {
            "theta_prime": [p.detach().cpu().clone() for p in self.params_p],
            "optimizer": opt,
            "lr": ep["lr"],
            "h": ep["h"],
            "identifier": ep["identifier"],
        }

    def load_attacker_state(self, state: dict) -> None:
        with torch.no_grad():
            for p, v in zip(self.params_p, state["theta_prime"]):
                copy_into(p, v)
        opt = self._new_inner_optimizer(state["lr"])
        if self.in_backward:
            for p, sd in zip(self.params_p, state["optimizer"]):
                self._inner[p].load_state_dict(sd)
        else:
            opt.load_state_dict(state["optimizer"])
        self._episode = {
            "opt": opt,
            "lr": state["lr"],
            "h": state["h"],
            "identifier": state.get("identifier", 0),
        }

    def load_state_dict(self, state: dict) -> None:
        self.unet.load_state_dict(state["unet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["rng"])
        self._rng_at_step_start = self.generator.get_state()
        self.step = int(state["step"])
        self.history = list(state["history"])
        if state.get("attacker") is not None and self.step % self.cfg.resync_every:
            self.load_attacker_state(state["attacker"])


# ------------------------------------------------------------------------------------------
# run identity
# ------------------------------------------------------------------------------------------
def identity_settings(config: ProtectConfig) -> dict:
    """The settings that determine the trajectory (all but the number of outer steps and how it runs)."""
    return {
        k: v
        for k, v in config.to_dict().items()
        if k not in RUN_IDENTITY_EXCLUDE and k not in ("model", "images")
    }


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
    positives, class_images = fixed_images(config, model, subjects, size, progress, should_stop)
    data = encode_data(config, model, subjects, positives, class_images, progress, should_stop)
    data.extra = get_method(config.method).prepare(
        config, model, subjects, positives, size, progress, should_stop
    )
    anchors = generate_anchor_images(config, model, size, progress, should_stop)
    if anchors:
        data.anchor = AnchorSet(
            [LatentBank(*model.encode_images(images)) for _, images in anchors],
            model.encode_prompts([prompt for prompt, _ in anchors]),
        )
    return data


def fixed_images(
    config: ProtectConfig,
    model: SDModel,
    subjects,
    size: int,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> tuple[list, list]:
    """The positives x+ (``positives[i]`` pairs with ``subjects[i]``) and the prior class images."""
    positives, class_images = generate_fixed_images(config, model, subjects, size, progress, should_stop)
    if config.pair_order == "listdir":  # the released code pairs two unsorted directory listings:
        # emulate that arbitrary (but here reproducible) pairing with a name-keyed permutation
        order = sorted(
            range(len(positives)), key=lambda i: zlib.crc32(f"{config.seed}:{subjects[i].name}".encode())
        )
        positives = [positives[i] for i in order]
    return positives, class_images


def encode_data(
    config: ProtectConfig,
    model: SDModel,
    subjects,
    positives: list,
    class_images: list,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> ProtectionData:
    """VAE latent distributions of the fixed images and the two prompt embeddings, computed once."""
    tracker = Tracker("encode", 3, progress, should_stop)
    subject = LatentBank(*model.encode_images([s.image for s in subjects]))
    positive = LatentBank(*model.encode_images(positives))
    tracker.update(message="images")
    prior = LatentBank(*model.encode_images(class_images)) if class_images else None
    tracker.update(message="class images")
    variants = identifier_prompts(config)
    embeds = model.encode_prompts([config.instance_prompt, config.class_prompt, *variants])
    tracker.update(message="prompts")
    return ProtectionData(
        subject, positive, prior, embeds[:1], embeds[1:2], Diffusion(model.noise_scheduler()),
        identifier_embeds=embeds[2:] if variants else None,
    )  # fmt: skip


def identifier_prompts(config: ProtectConfig) -> list[str]:
    """The instance prompt with each of ``extra_identifiers`` in place of its identifier (the word
    of the instance prompt that the class prompt lacks)."""
    if not config.extra_identifiers:
        return []
    class_words = set(config.class_prompt.split())
    words = config.instance_prompt.split()
    own = [i for i, w in enumerate(words) if w not in class_words]
    if len(own) != 1:
        raise InputError(
            f"extra_identifiers needs an instance prompt with exactly one word the class prompt lacks "
            f"(e.g. 'a photo of sks dog' / 'a photo of dog'); {config.instance_prompt!r} has {len(own)}."
        )
    return [" ".join(words[: own[0]] + [w] + words[own[0] + 1 :]) for w in config.extra_identifiers]


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
    restart: bool = False,
) -> ProtectResult:
    """Protect ``config.model`` against personalization of the subject in ``config.images``.

    ``model``/``images`` may be passed preloaded (hosts do); the input model is never
    modified: the result holds a new protected UNet beside the original components.
    ``progress`` receives a ProgressEvent every inner step; ``should_stop`` is checked every
    inner step and stops the run within one step, saving the resumable state first
    (``result.cancelled``; call again with ``resume=True`` to continue). Any other exception
    from a host (an interrupt raised inside ``progress``) also saves the state, then propagates.
    With ``config.output`` set, the protected model is written there (atomically).
    A state file of an earlier, interrupted run is never ignored: without ``resume`` (continue
    it) or ``restart`` (start over and replace it) the call refuses with an InputError. On Ctrl-C
    the state is saved and the KeyboardInterrupt carries its path as ``state_path``.
    """
    if model is None:
        return _protect(config, progress, should_stop, model=None, images=images, resume=resume,
                        keep_state=keep_state, overwrite=overwrite, restart=restart)  # fmt: skip
    saved = ModelState(model)
    done = False
    try:
        result = _protect(config, progress, should_stop, model=model, images=images, resume=resume,
                          keep_state=keep_state, overwrite=overwrite, restart=restart)  # fmt: skip
        done = not result.cancelled
        return result
    finally:  # the caller's model as it was (a finished run's result shares its VAE and text encoder)
        saved.restore(devices_of_shared=not done)


class ModelState:
    """Devices, requires_grad flags and train/eval modes of a model's modules, to put back later."""

    def __init__(self, model: SDModel) -> None:
        self.modules = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder}
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
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    *,
    model: SDModel | None = None,
    images=None,
    resume: bool = False,
    keep_state: bool = False,
    overwrite: bool = False,
    restart: bool = False,
) -> ProtectResult:
    """protect() without the care for a preloaded model's state."""
    config.validate()
    check_flags(resume, restart)
    t_start = time.perf_counter()
    inputs = input_paths(config, images, model)
    check_paths([("output", config.output), ("state file", config.state_path),
                 ("cache folder", cache_folder(config.cache_dir))], inputs)  # fmt: skip
    device = resolve_device(config.device)
    parallel = setup_parallel(config, device.type)  # accelerate, when launched with several processes
    if parallel.active:
        device = parallel.device if parallel.device.type != "cpu" else torch.device("cpu")
        progress = progress if parallel.is_main else None
    if model is None:  # a diffusers folder, or a single file of type config.model_type
        model = load_model(config.model, device=device, model_type=config.model_type)
    else:
        model.to(device)
    if config.output:  # fail before hours of training, not after
        check_output(config.output, overwrite, model, tuple(p for _, p in inputs))
    size = config.resolution or model.native_resolution
    source = images if images is not None else config.images
    subjects = load_subject_images(
        source, size, order=config.pair_order, min_side=None if size >= 256 else size
    )
    run = RunDriver.open(
        "protection", identity_settings=identity_settings(config), model=model, subjects=subjects,
        state_path=config.state_path, output=config.output, cache_dir=config.cache_dir, suffix=".apdm-state.pt",
        folder="state", version=STATE_VERSION, settings=config.to_dict(), grows="outer_steps", inputs=inputs,
        resume=resume, restart=restart, writer=parallel.is_main,
    )  # fmt: skip
    preflight([("output", config.output, module_bytes(model.unet, model.vae, model.text_encoder)),
               ("state file", run.state_path, module_bytes(model.unet) * (6 if config.resync_every > 1 else 3))])  # fmt: skip
    with torch.inference_mode(False), torch.enable_grad():
        try:
            with parallel.main_first():  # the main process fills the pair cache, the others read it
                data = prepare_data(config, model, subjects, size, progress, should_stop)
        except Cancelled:
            return ProtectResult(model, config, 0, cancelled=True, seconds=time.perf_counter() - t_start)
        if device.type == "cuda":  # the frozen encoders are done: free their memory
            model.vae.to("cpu")
            model.text_encoder.to("cpu")
            torch.cuda.empty_cache()
        trainer = L2PTrainer(config, model, data, device, parallel)
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
        # on a stop (Cancelled, Ctrl-C, a host interrupt from the progress callback) theta and the outer
        # optimizer are untouched mid-step: they are saved with the RNG state of the interrupted step's
        # start, so a resumed run redoes that step exactly
        cancelled = run.loop(
            lambda: trainer.outer_step(tracker), lambda: trainer.step, config.outer_steps, tracker=tracker,
            state=trainer.state_dict, state_interrupted=lambda: trainer.state_dict(at_step_start=True),
            save_every=config.save_every,
        )  # fmt: skip
        protected = result_model(model, trainer.finish())
    result = ProtectResult(
        protected, config, trainer.step, cancelled, trainer.history, run.state_path if cancelled else None
    )
    if not cancelled and parallel.is_main:  # one process writes
        write = (lambda: write_output(protected, config, config.output, overwrite=overwrite, subjects=source,
                                      inputs=tuple(p for _, p in inputs))) if config.output else (lambda: None)  # fmt: skip
        result.output = run.finish(write, trainer.state_dict, keep_state)
        result.state_path = run.state_path if keep_state else None
    parallel.wait()
    result.processes, result.distributed = parallel.world_size, parallel.kind
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


def input_paths(config: ProtectConfig, images=None, model: SDModel | None = None) -> list[tuple[str, Path]]:
    """What a run reads (the model, the subject photos, class images, backdoor images): never written."""
    return source_paths(model=[config.model, getattr(model, "source", None) or ""],
                        photos=config.images if images is None else images, class_images=config.class_images,
                        backdoor_images=config.backdoor_images)  # fmt: skip


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


class _CallableModule(types.ModuleType):
    """This module, callable as ``protect()``.

    ``from apdm_core import protect`` (the README's API) must give the function, but once this
    submodule is imported Python binds the *module* to ``apdm_core.protect``, over the package's
    lazy attribute. Calling the module runs the function, so both spellings work.
    """

    def __call__(self, *args, **kwargs) -> ProtectResult:
        return protect(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
