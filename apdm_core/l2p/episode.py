"""The simulated attacker: one DreamBooth trajectory on theta', an *episode*.

An episode starts from theta (theta' <- theta) with a fresh optimizer, a learning rate (fixed, or
drawn log-uniformly from [lr_personalize, lr_personalize_max]) and an identifier (the instance
prompt's own, or one of extra_identifiers). The paper starts a new episode every outer step;
with ``resync_every`` R > 1 an episode lives on for R outer steps (a persistent attacker) and its
state is part of the resumable state file.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from ..config import ProtectConfig
from ..parallel import copy_into
from .placement import Weights


@dataclass
class Episode:
    """One simulated attacker: its optimizer, learning rate, identifier and the attack steps it took."""

    opt: torch.optim.Optimizer | None  # None with optimizer_in_backward (per-parameter optimizers)
    lr: float
    identifier: int  # 0 = the instance prompt's identifier, k = extra_identifiers[k - 1]
    h: int = 0  # attack steps done in this episode
    inner: dict | None = None  # optimizer_in_backward: parameter -> its optimizer


class Attacker:
    """Starts episodes on theta' and takes their DreamBooth steps (one home for the inner optimizer)."""

    def __init__(self, cfg: ProtectConfig, weights: Weights, generator: torch.Generator) -> None:
        self.cfg, self.weights, self.generator = cfg, weights, generator
        self.current: Episode | None = None
        self._stepping = False  # optimizer_in_backward: the hooks step only inside an attack step
        self._add_to_accum = False
        if weights.in_backward:
            self._accum_of = dict(zip(weights.params_p, weights.accum))
            for p in weights.params_p:
                p.register_post_accumulate_grad_hook(self._step_in_backward)

    # --- episodes ------------------------------------------------------------------------------
    def start(self) -> Episode:
        """theta' <- theta and a fresh attacker (learning rate, then identifier: the order of the draws)."""
        self.weights.refill_prime()
        lr = self._draw_lr()
        opt, inner = self._optimizer(lr)
        self.current = Episode(opt, lr, self._draw_identifier(), inner=inner)
        return self.current

    def end(self) -> None:
        self.current = None

    def _draw_lr(self) -> float:
        lo, hi = self.cfg.lr_personalize, self.cfg.lr_personalize_max
        if hi <= lo:
            return lo
        u = float(torch.rand((), generator=self.generator))
        return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))

    def _draw_identifier(self) -> int:
        n = len(self.cfg.extra_identifiers)
        return int(torch.randint(0, n + 1, (), generator=self.generator)) if n else 0

    def _optimizer(self, lr: float) -> tuple[torch.optim.Optimizer | None, dict | None]:
        w = self.weights
        if w.in_backward:
            return None, {p: w.adamw([p], lr) for p in w.params_p}
        return w.adamw(w.params_p, lr), None

    # --- one attack step -----------------------------------------------------------------------
    def step(self, loss: torch.Tensor, add_to_accum: bool = False) -> None:
        """One DreamBooth step on theta' from its loss: gradient, clipping as the real attacker, optimizer.

        ``add_to_accum``: also add grad L_per(theta'_{j-1}) to the protection gradient (the released code)."""
        w, episode = self.weights, self.current
        if w.in_backward:  # each parameter steps (and adds to the accumulator) as its grad is ready
            self._stepping, self._add_to_accum = True, add_to_accum
            try:
                loss.backward()
            finally:
                self._stepping = False
        else:
            loss.backward()
            if self.cfg.inner_max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(w.params_p, self.cfg.inner_max_grad_norm)
            episode.opt.step()
            if add_to_accum:
                w.add_prime_grads_to_accum()
        w.clear_prime_grads()
        episode.h += 1

    def _step_in_backward(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook of theta' (optimizer_in_backward): step this parameter, free its grad."""
        if not self._stepping:
            return
        with torch.no_grad():
            if self._add_to_accum:
                self._accum_of[p].add_(p.grad)
            self.current.inner[p].step()
        p.grad = None

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """theta', the attacker's optimizer state, lr, steps done and identifier (CPU copies)."""
        ep, params = self.current, self.weights.params_p
        if ep.inner is not None:
            opt = [copy.deepcopy(ep.inner[p].state_dict()) for p in params]
        else:
            opt = copy.deepcopy(ep.opt.state_dict())
        return {
            "theta_prime": [p.detach().cpu().clone() for p in params],
            "optimizer": opt,
            "lr": ep.lr,
            "h": ep.h,
            "identifier": ep.identifier,
        }

    def load_state_dict(self, state: dict) -> None:
        params = self.weights.params_p
        with torch.no_grad():
            for p, v in zip(params, state["theta_prime"]):
                copy_into(p, v)
        opt, inner = self._optimizer(state["lr"])
        if inner is not None:
            for p, sd in zip(params, state["optimizer"]):
                inner[p].load_state_dict(sd)
        else:
            opt.load_state_dict(state["optimizer"])
        self.current = Episode(opt, state["lr"], state.get("identifier", 0), state["h"], inner)
