"""The Learning to Protect trainer: one outer step of the paper's Algorithm 1 (first order).

Per outer step k::

    theta' <- theta                     (a new episode; with resync_every R > 1 only every R steps)
    for j in 1..N_per:
        one DreamBooth step on theta'                                  -> theta'_j
        every protect_every-th step: g += w_j * grad_theta' L_protect(theta'_j)
    theta.grad <- g (+ the anchor and the method's term at theta); one outer optimizer step

``L_protect`` is the method's loss (``apdm_core/methods``: APDM's DPO/target/naive, PersGuard's
retention); ``accumulation='protect+personalize'`` also adds grad L_per(theta'_{j-1}) (the released
code); ``inner_steps=0`` is the protection loss at theta itself (DPO without L2P). All randomness
comes from one CPU generator whose state is saved, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import ProtectConfig
from ..errors import InputError, TrainingDiverged
from ..interrupts import uninterrupted
from ..levers import require_bitsandbytes
from ..losses import noise_prediction_loss
from ..methods import get_method
from ..models import SDModel
from ..parallel import Parallel
from ..progress import Tracker
from ..training import dreambooth_loss
from .data import ProtectionData, identifier_prompts
from .episode import Attacker
from .nullspace import NullSpace
from .placement import Weights
from .sharpness import flat_protection_gradient
from .unrolled import unrolled_attack_steps

STATE_VERSION = 1


class StepLog:
    """What one outer step measured: losses per term, the protection weights used."""

    def __init__(self) -> None:
        self.per: list[float] = []
        self.protect: list[float] = []
        self.terms: dict[str, list[float]] = {}
        self.weight = 0.0  # sum of the protection gradients' weights (late_weighting)

    def add(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            self.terms.setdefault(k, []).append(v)

    def losses(self) -> dict[str, float]:
        """The latest losses, for the progress bar."""
        return {"per": self.per[-1], **({"protect": self.protect[-1]} if self.protect else {})}


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class L2PTrainer:
    """theta, the simulated attacker on theta' and the method's losses; ``outer_step`` is Algorithm 1."""

    def __init__(
        self,
        config: ProtectConfig,
        model: SDModel,
        data: ProtectionData | list[ProtectionData],
        device: torch.device,
        parallel: Parallel | None = None,
        reference: SDModel | None = None,
    ) -> None:
        self.cfg, self.model, self.device = config, model, device
        # one ProtectionData per subject (config.subjects): the episodes take them in turn
        self.datas = list(data) if isinstance(data, (list, tuple)) else [data]
        self.parallel = parallel or Parallel()
        self.method = get_method(config.method)
        if config.optimizer == "adamw8bit":
            require_bitsandbytes(device)
        self.weights = Weights(config, model, device, self.parallel, reference=reference)
        self.optimizer = self.weights.adamw(
            self.weights.protected_params, config.lr_protect, config.protect_beta1
        )
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        self.attacker = Attacker(config, self.weights, self.generator)
        self.null_space = None  # the class (and anchor) prompts' keys and values kept as they were
        if config.null_space > 0:
            kept = [d.class_embeds for d in self.datas]
            if config.null_space_anchors and self.datas[0].anchor is not None:
                kept.append(self.datas[0].anchor.embeds)
            self.null_space = NullSpace(self.weights.unet, torch.cat(kept), config.null_space)
        self.persistent = config.resync_every > 1
        # interleave_subjects: the subjects take turns by outer step, each with its own attacker, parked
        # between its turns as (its state, theta's protected weights when parked)
        self.interleave = config.interleave_subjects and len(self.datas) > 1
        self.parked: dict[int, tuple[dict, list[torch.Tensor]]] = {}
        self._parked_at_step_start: dict | None = None
        self._current_subject = 0
        self.step = 0
        self.history: list[dict] = []
        self._rng_at_step_start = self.generator.get_state()
        self._attacker_at_step_start: dict | None = None  # a persistent attacker's state at this step's start
        # tail_average: the sum of theta's protected weights after each of the run's last tail_average steps
        self.tail_sum: list[torch.Tensor] | None = None
        self.tail_count = 0
        # theta's protected weights, once finish() exported the mean
        self._final_theta: dict[str, torch.Tensor] = {}

    # --- what the methods read -------------------------------------------------------------------
    unet = property(lambda self: self.weights.unet)  # theta
    unet_p = property(lambda self: self.weights.unet_p)  # theta'
    run_p = property(lambda self: self.weights.run_p)
    ref_unet = property(lambda self: self.weights.ref_unet)
    run_ref = property(lambda self: self.weights.run_ref)
    forward = property(lambda self: self.weights.forward)
    forward_ref = property(lambda self: self.weights.forward_ref)
    params_p = property(lambda self: self.weights.params_p)
    accum = property(lambda self: self.weights.accum)

    @property
    def subject_index(self) -> int:
        return self.subject_at(self.step)

    def subject_at(self, step: int) -> int:
        """The subject of outer step ``step`` (0-based): the subjects in turn, one episode (resync_every
        steps) each, or one outer step each with interleave_subjects."""
        n = len(self.datas)
        return step % n if self.interleave else (step // self.cfg.resync_every) % n

    @property
    def data(self) -> ProtectionData:
        """What the current episode samples from (its subject's photos, pairs and prompts)."""
        return self.datas[self.subject_index]

    @property
    def inner_batch(self) -> int:
        """Subject images per attack step: the current episode's draw, else inner_batch_size (or batch_size)."""
        ep = self.attacker.current
        return (ep.batch if ep is not None else 0) or self.cfg.inner_batch_size or self.cfg.batch_size

    @property
    def instance_embeds(self) -> torch.Tensor:
        """The instance prompt of the current episode (its identifier, with extra_identifiers)."""
        ep = self.attacker.current
        k = ep.identifier if ep is not None else 0
        if k == 0 or self.data.identifier_embeds is None:
            return self.data.instance_embeds
        return self.data.identifier_embeds[k - 1 : k]

    # --- one outer step ----------------------------------------------------------------------------
    def outer_step(self, tracker: Tracker | None = None) -> dict:
        cfg, t0, where = self.cfg, time.perf_counter(), f"outer step {self.step + 1}"
        self._rng_at_step_start = self.generator.get_state()
        episode = self.episode_for_this_step()
        log = StepLog()
        if cfg.inner_steps == 0:  # the protection loss at theta itself
            self.weights.clear_prime_grads()
            self.protection_gradient(log, where)
            if tracker is not None:
                tracker.update(losses={"protect": log.protect[-1]}, outer=self.step + 1, inner=0)
        if cfg.hypergradient and episode.lora is None:  # (validate: hypergradient needs inner_steps >= 1)
            unrolled_attack_steps(self, log, episode, tracker, where)  # second order, through the steps
        else:
            self.attack_steps(log, episode, tracker, where)
        if cfg.conflict_weight > 0 and cfg.inner_steps:
            self.conflict_gradient(log)
        if cfg.trap_weight > 0 and cfg.inner_steps and self.data.anchor is not None:
            self.trap_gradient(log, episode.h)
        with uninterrupted():  # theta's update and the step counter: one unit for the saver
            log.add(self.apply_outer_update(log.weight))
            self.step += 1
            self.add_to_tail()
            self._rng_at_step_start = self.generator.get_state()  # now the start of the next step
            self._attacker_at_step_start = self._parked_at_step_start = None
        if not self.persistent:
            self.attacker.end()
        return self.record(log, episode, time.perf_counter() - t0)

    def attack_steps(self, log: StepLog, episode, tracker: Tracker | None, where: str) -> None:
        """The outer step's inner_steps attack steps on theta', each protect_every-th followed by the
        protection gradient at theta' as the step left it (first order)."""
        cfg = self.cfg
        for j in range(cfg.inner_steps):
            where_j = f"{where}, inner step {j + 1}"
            self.weights.clear_prime_grads()
            loss = self.personalization_loss(self.run_p)
            log.per.append(
                self._check(
                    self.parallel.mean({"per": float(loss.detach())})["per"], "personalization", where_j
                )
            )
            self.attacker.step(loss, add_to_accum=cfg.accumulation == "protect+personalize")
            if episode.h % cfg.protect_every == 0:
                self.protection_gradient(log, where_j, self.protect_weight(episode.h))
            if tracker is not None:
                tracker.update(losses=log.losses(), outer=self.step + 1, inner=j + 1)

    def episode_for_this_step(self):
        """A new episode (theta' <- theta) every resync_every outer steps; else the accumulator restarts."""
        if self.interleave:
            return self.interleaved_episode()
        if self.attacker.current is None or self.step % self.cfg.resync_every == 0:
            # the kind follows this subject's own episode count: with subjects and kinds in turn by the
            # run's episode count, 2 subjects and [full, lora] would give each subject one kind only
            self.attacker.start(self.step // self.cfg.resync_every // len(self.datas))
        else:  # the persistent attacker continues where the last outer step left it
            self.weights.zero_accum()
        if self.persistent:  # what a resume from this step's start needs
            self._attacker_at_step_start = self.attacker.state_dict()
        return self.attacker.current

    def interleaved_episode(self):
        """interleave_subjects: park the last step's attacker; this step's subject starts an episode every
        resync_every of its own outer steps, else its parked attacker returns, theta' following what theta
        did meanwhile (as follow_theta does every outer step for the attacker in play)."""
        i, own, r = self.subject_index, self.step // len(self.datas), self.cfg.resync_every
        if self.attacker.current is not None:
            self.parked[self._current_subject] = self.parking()
            self.attacker.end()
        self._parked_at_step_start = dict(self.parked)  # what a resume from this step's start needs
        self._current_subject = i
        if own % r == 0 or i not in self.parked:
            self.parked.pop(i, None)
            self.attacker.start(own // r)
        else:
            state, theta_then = self.parked.pop(i)
            # the optimizer and the adapters would alias the parked tensors (kept for a resume from this step)
            self.attacker.load_state_dict({**state, **{k: copy.deepcopy(state[k]) for k in ("optimizer", "lora")
                                                       if k in state}})  # fmt: skip
            self.weights.follow_protected(theta_then)
            self.weights.zero_accum()
        return self.attacker.current

    def protection_gradient(self, log: StepLog, where: str, weight: float = 1.0) -> None:
        """Add ``weight`` x grad of the method's protection loss at theta' to the accumulator."""
        if self.cfg.sam_radius > 0:  # at theta' moved toward where the protection is weakest
            return flat_protection_gradient(self, log, where, weight)
        self.weights.accumulate(self.protection_term(self.run_p, log, where, weight))

    def protection_term(self, unet, log: StepLog, where: str, weight: float = 1.0) -> torch.Tensor:
        """``weight`` x the method's protection loss at the weights of ``unet``, checked and logged (its value,
        its terms, the weight) in ``log``."""
        loss, stats = self.protection_loss(unet)
        logged = self.parallel.mean({"protect": float(loss.detach()), **stats})
        log.protect.append(self._check(logged.pop("protect"), "protection", where))
        log.weight += weight
        log.add(logged)
        return loss if weight == 1.0 else loss * weight

    def conflict_gradient(self, log: StepLog) -> None:
        """conflict_weight: add the gradient of the cosine between the attacker's own gradients on two
        independent batches at theta' (what its optimizer trains: theta', or a LoRA episode's adapters).
        Adam's step follows E[g] / sqrt(E[g^2]); gradients that disagree from batch to batch slow it.
        Second order (a double backward; PyTorch's math attention, the only SDPA kernel that has one)."""
        ep = self.attacker.current
        params = ep.lora.params if ep.lora is not None else self.params_p
        with sdpa_kernel(SDPBackend.MATH):
            grads = [
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
                for loss in (self.personalization_loss(self.run_p) for _ in range(2))
            ]
            cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
            self.weights.accumulate(self.cfg.conflict_weight * cos)
        log.add({"conflict": float(cos.detach())})

    def trap_gradient(self, log: StepLog, h: int) -> None:
        """trap_weight w: add w * h/H * ||eps_theta'(x_t, t, c) + eps_ref(x_t, t, c)||^2 on a batch of noised anchor
        images with their prompts, h of H attack steps into the episode: the further the simulated attacker has
        walked, the more its model is pulled to predict the opposite of the original's (a collapse trap, as
        CTRAP's for language models), while the anchor keeps theta's predictions."""
        ramp = h / self.episode_steps
        pred, ref = self.anchor_predictions(self.run_p)
        loss = noise_prediction_loss(pred, -ref)
        self.weights.accumulate(self.cfg.trap_weight * ramp * loss)
        log.add({"trap": float(loss.detach())})

    @property
    def episode_steps(self) -> int:
        """H, the attack steps of one simulated attacker episode (resync_every outer x inner_steps)."""
        return self.cfg.resync_every * self.cfg.inner_steps

    def protect_weight(self, h: int) -> float:
        """Weight of the protection gradient after attack step h of the episode (late_weighting)."""
        if not self.cfg.late_weighting:
            return 1.0
        return math.exp(self.cfg.late_weighting * (h - self.episode_steps))

    def record(self, log: StepLog, episode, seconds: float) -> dict:
        """The history entry of the step just taken."""
        cfg = self.cfg
        entry = {
            "step": self.step,
            "loss_per": mean(log.per),
            "loss_protect": mean(log.protect),
            **{k: mean(v) for k, v in log.terms.items()},
            "seconds": seconds,
        }
        if self.persistent or cfg.lr_personalize_max > cfg.lr_personalize:
            entry["attack_lr"] = episode.lr
        if len(cfg.attacker_family) > 1 or cfg.attacker_family != ["full"]:
            entry["attacker"] = episode.label
        if len(self.datas) > 1:
            entry["subject"] = self.subject_at(self.step - 1) + 1
        if cfg.inner_batch_sizes:
            entry["attack_batch"] = episode.batch
        if cfg.extra_identifiers:
            entry["identifier"] = ([cfg.instance_prompt] + identifier_prompts(cfg))[episode.identifier]
        self.history.append(entry)
        return entry

    # --- the losses ------------------------------------------------------------------------------
    def personalization_loss(self, unet) -> torch.Tensor:
        """DreamBooth loss of the simulated attacker: instance term + lambda * prior term (one forward)."""
        d = self.data
        return dreambooth_loss(
            unet,
            self.forward,
            d.diffusion,
            d.subject,
            self.instance_embeds,
            self.generator,
            self.inner_batch,
            d.prior,
            d.class_embeds,
            self.cfg.prior_weight,
            shard=self.parallel.shard(self.inner_batch),
        )

    def protection_loss(self, unet) -> tuple[torch.Tensor, dict[str, float]]:
        """The method's protection loss at the current weights of ``unet`` (theta' after attack steps)."""
        return self.method.protection_loss(self, unet)

    def anchor_predictions(self, unet) -> tuple[torch.Tensor, torch.Tensor]:
        """(``unet``'s prediction, the frozen original's) on 16 noised anchor images with their prompts."""
        d, g = self.data, self.generator
        z0, embeds = d.anchor.draw(16, g)
        batch = d.diffusion.noisy(z0, embeds, g)
        pred = self.forward(unet, batch)
        with torch.no_grad():
            ref = self.forward_ref(self.run_ref, batch)
        return pred, ref

    def anchor_loss(self) -> torch.Tensor:
        """Distillation of theta to the frozen original on noised anchor images with their prompts."""
        return noise_prediction_loss(*self.anchor_predictions(self.unet))

    def apply_outer_update(self, protect_weight: float = 1.0) -> dict[str, float]:
        """theta.grad <- the accumulated protection gradient (+ the anchor's and the method's terms at
        theta); one outer optimizer step. With a persistent attacker the same change of theta is
        applied to theta'. Returns the losses of the terms at theta."""
        w, scale = self.weights, max(protect_weight, 1.0)  # terms at theta relative to one protection term
        w.accumulated_into_theta_grad()
        stats = {}
        if self.cfg.anchor_weight > 0 and self.data.anchor is not None:
            loss = self.anchor_loss()  # backward adds into theta.grad, the accumulated gradient
            (self.cfg.anchor_weight * scale * loss).backward()
            stats["anchor"] = self._check(loss, "anchor", f"outer step {self.step + 1}")
        at_theta = self.method.theta_loss(self)
        if at_theta is not None:
            loss, method_stats = at_theta
            (scale * loss).backward()
            self._check(loss, self.method.name, f"outer step {self.step + 1}")
            stats.update(method_stats)
        before = [p.detach().clone() for p in w.params] if self.persistent else None
        kept = self.null_space.snapshot() if self.null_space is not None else None
        self.optimizer.step()
        if kept is not None:
            self.null_space.project(kept)
        w.clear_theta_grads()
        if before is not None:
            w.follow_theta(before)
        return stats

    def _check(self, value: torch.Tensor | float, what: str, where: str) -> float:
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(v):
            raise TrainingDiverged(
                f"The {what} loss became {v} at {where}. Lower the learning rates (e.g. halve lr_protect and "
                "lr_personalize), keep mixed_precision='no', or check the images; resume from the last state file."
            )
        return v

    def check_accumulation(self) -> None:
        self.weights.check_accumulation()

    # --- tail averaging ----------------------------------------------------------------------------
    @property
    def tail_start(self) -> int:
        """The outer step after which theta enters the tail average (tail_average)."""
        return self.cfg.outer_steps - self.cfg.tail_average

    def add_to_tail(self) -> None:
        """tail_average: add theta's protected weights after this step to the tail's sum (in float32)."""
        if not self.cfg.tail_average or self.step <= self.tail_start:
            return
        with torch.no_grad():
            if self.tail_sum is None:
                self.tail_sum = [
                    torch.zeros_like(p, dtype=torch.float32) for p in self.weights.protected_params
                ]
            for s, p in zip(self.tail_sum, self.weights.protected_params):
                s.add_(p.detach().float())
        self.tail_count += 1

    def finish(self):
        """The protected UNet as a plain module on the compute device; the base model back where it was.
        With tail_average, once the run is complete, its protected weights are the tail's mean (theta itself
        stays in the state file)."""
        if self.tail_sum is not None and self.step >= self.cfg.outer_steps and not self._final_theta:
            params = self.weights.protected_params
            protected = {id(p) for p in params}
            self._final_theta = {
                n: p.detach().cpu().clone() for n, p in self.unet.named_parameters() if id(p) in protected
            }
            with torch.no_grad():
                for p, s in zip(params, self.tail_sum):
                    p.copy_(s / self.tail_count)
        return self.weights.finish()

    # --- state -----------------------------------------------------------------------------------
    def state_dict(self, at_step_start: bool = False) -> dict:
        state = {
            "version": STATE_VERSION,
            "step": self.step,
            "unet": self.theta_state(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self._rng_at_step_start if at_step_start else self.generator.get_state(),
            "history": self.history,
        }
        if self.tail_sum is not None:
            state["tail"] = {"from": self.tail_start, "count": self.tail_count,
                             "sum": [t.detach().cpu() for t in self.tail_sum]}  # fmt: skip
        if self.interleave:  # every subject's attacker, parked
            state["parked"] = self.parked_state(at_step_start)
        elif self.persistent and self.attacker.current is not None:  # the attacker lives on between steps
            start = self._attacker_at_step_start if at_step_start else None
            state["attacker"] = start if start is not None else self.attacker.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.unet.load_state_dict(state["unet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["rng"])
        self._rng_at_step_start = self.generator.get_state()
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.load_tail(state.get("tail"))
        if self.interleave:
            device = self.weights.protected_params[0].device
            self.parked = {
                int(i): (st, [t.to(device) for t in theta]) for i, (st, theta) in state["parked"].items()
            }
            self.attacker.end()
        elif state.get("attacker") is not None and self.step % self.cfg.resync_every:
            self.attacker.load_state_dict(state["attacker"])

    def theta_state(self) -> dict[str, torch.Tensor]:
        """theta's weights on the CPU (theta itself, also after finish() put the tail's mean in its place)."""
        return {**{k: v.detach().cpu() for k, v in self.unet.state_dict().items()}, **self._final_theta}

    def load_tail(self, tail: dict | None) -> None:
        """The tail average of a resumed run; its window must be the one this run's outer_steps gives."""
        same_window = tail is not None and tail["from"] == self.tail_start
        if self.cfg.tail_average and self.step > self.tail_start and not same_window:
            was = "no tail" if tail is None else f"the tail from outer step {tail['from']}"
            raise InputError(
                f"The state file is at outer step {self.step} and holds {was}, but tail_average="
                f"{self.cfg.tail_average} with outer_steps={self.cfg.outer_steps} averages from step {self.tail_start}, "
                "which has passed: resume with the outer_steps the run was started with, or restart."
            )
        if not (self.cfg.tail_average and same_window):
            self.tail_sum, self.tail_count = None, 0
            return
        device = self.weights.protected_params[0].device
        self.tail_sum, self.tail_count = [t.to(device) for t in tail["sum"]], int(tail["count"])

    def parked_state(self, at_step_start: bool) -> dict:
        """interleave_subjects: the parked attackers (with the one in play, when not at a step's start)."""
        if at_step_start and self._parked_at_step_start is not None:
            parked = self._parked_at_step_start
        else:
            parked = dict(self.parked)
            if self.attacker.current is not None:
                parked[self._current_subject] = self.parking()
        return {i: (st, [t.detach().cpu() for t in theta]) for i, (st, theta) in parked.items()}

    def parking(self) -> tuple[dict, list[torch.Tensor]]:
        """The attacker in play as parked: its state and theta's protected weights now."""
        return self.attacker.state_dict(), self.weights.protected_snapshot()
