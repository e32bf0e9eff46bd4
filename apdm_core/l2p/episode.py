"""The simulated attacker: one personalization trajectory from theta, an *episode*.

An episode starts from theta (theta' <- theta) with a fresh optimizer, a learning rate, an
identifier (the instance prompt's own, or one of extra_identifiers) and a batch size (drawn from
inner_batch_sizes when given). Its kind comes from
``attacker_family``, one per episode in turn:

- ``full``: DreamBooth on the whole UNet theta' (the paper's attacker); lr fixed, or drawn
  log-uniformly from [lr_personalize, lr_personalize_max];
- ``lora``: DreamBooth-LoRA as people run it: low-rank adapters B A (rank drawn from
  ``lora_ranks``, alpha = rank as diffusers' script, A Gaussian with std 1/rank as peft's, B zero)
  on every attention projection (to_q, to_k, to_v, to_out.0 of self- and cross-attention), added by
  forward hooks to theta' = theta, which stays as it is; lr drawn from [lora_lr, lora_lr_max]. The
  protection gradient at theta + B A is taken with respect to theta (first order: the gradient at
  the adapted weights applies to the base weights directly).

The paper starts a new episode every outer step; with ``resync_every`` R > 1 an episode lives on
for R outer steps (a persistent attacker) and its state is part of the resumable state file.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from ..config import ProtectConfig
from ..parallel import copy_into
from .placement import Weights

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' DreamBooth-LoRA targets


class LoRAAdapters:
    """Low-rank adapters on the attention projections of a UNet, applied by forward hooks (the
    module's own weights stay as they are and keep receiving gradients): y = W x + B (A x)."""

    def __init__(
        self, unet, rank: int, device, generator: torch.Generator | None = None, tensors=None
    ) -> None:
        self.rank = rank
        self.params: list[torch.Tensor] = []
        self.hooks = []
        layers = [m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
                  and (".attn1." in n or ".attn2." in n) and n.endswith(LORA_TARGETS)]  # fmt: skip
        saved = iter(tensors or ())
        for m in layers:
            if tensors is None:  # peft's "gaussian" init: A ~ N(0, 1/rank), B = 0 (the adapter starts at 0)
                a = torch.randn(rank, m.in_features, generator=generator) / rank
                b = torch.zeros(m.out_features, rank)
            else:
                a, b = next(saved), next(saved)
            a = a.to(device, m.weight.dtype).requires_grad_(True)
            b = b.to(device, m.weight.dtype).requires_grad_(True)
            self.hooks.append(m.register_forward_hook(self._hook(a, b)))
            self.params += [a, b]

    @staticmethod
    def _hook(a: torch.Tensor, b: torch.Tensor):
        def add_low_rank(module, args, out):
            return out + torch.nn.functional.linear(torch.nn.functional.linear(args[0], a), b)

        return add_low_rank

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def state(self) -> list[torch.Tensor]:
        return [p.detach().cpu().clone() for p in self.params]


@dataclass
class Episode:
    """One simulated attacker: its optimizer, learning rate, identifier and the attack steps it took."""

    opt: torch.optim.Optimizer | None  # None with optimizer_in_backward (per-parameter optimizers)
    lr: float
    identifier: int  # 0 = the instance prompt's identifier, k = extra_identifiers[k - 1]
    h: int = 0  # attack steps done in this episode
    inner: dict | None = None  # optimizer_in_backward: parameter -> its optimizer
    kind: str = "full"
    lora: LoRAAdapters | None = None  # kind 'lora': the adapters the attacker trains
    batch: int = 0  # subject images per attack step, drawn from inner_batch_sizes (0 = the config's)

    @property
    def label(self) -> str:
        return self.kind if self.lora is None else f"lora-r{self.lora.rank}"


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
    def start(self, index: int = 0) -> Episode:
        """theta' <- theta and a fresh attacker of the family's ``index``-th kind (in turn). The draws, in
        order: the learning rate, (LoRA) the rank and the adapters' init, the identifier, then the batch size."""
        self.end()
        self.weights.refill_prime()
        family = self.cfg.attacker_family
        kind = family[index % len(family)]
        if kind == "lora":
            lr = self._draw_lr(self.cfg.lora_lr, self.cfg.lora_lr_max)
            ranks = self.cfg.lora_ranks
            rank = (
                ranks[int(torch.randint(0, len(ranks), (), generator=self.generator))]
                if len(ranks) > 1
                else ranks[0]
            )
            lora = LoRAAdapters(self.weights.unet_p, rank, self.weights.device, self.generator)
            opt = self.weights.adamw(lora.params, lr)
            # (arguments are evaluated in order: the identifier is drawn before the batch size)
            self.current = Episode(
                opt, lr, self._draw_identifier(), kind=kind, lora=lora, batch=self._draw_batch()
            )
            return self.current
        lr = self._draw_lr(self.cfg.lr_personalize, self.cfg.lr_personalize_max)
        opt, inner = self._optimizer(lr)
        self.current = Episode(opt, lr, self._draw_identifier(), inner=inner, batch=self._draw_batch())
        return self.current

    def end(self) -> None:
        if self.current is not None and self.current.lora is not None:
            self.current.lora.remove()
        self.current = None

    def _draw_lr(self, lo: float, hi: float) -> float:
        if hi <= lo:
            return lo
        u = float(torch.rand((), generator=self.generator))
        return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))

    def _draw_identifier(self) -> int:
        n = len(self.cfg.extra_identifiers)
        return int(torch.randint(0, n + 1, (), generator=self.generator)) if n else 0

    def _draw_batch(self) -> int:
        sizes = self.cfg.inner_batch_sizes
        return int(sizes[int(torch.randint(0, len(sizes), (), generator=self.generator))]) if sizes else 0

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
        if episode.lora is not None:
            return self._lora_step(loss, episode)
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

    def _lora_step(self, loss: torch.Tensor, episode: Episode) -> None:
        """A LoRA attack step: only the adapters learn; theta' (= theta) takes no gradient meanwhile."""
        params, w = episode.lora.params, self.weights
        for p in params:  # the protection's backward at the adapted weights left gradients here too
            p.grad = None
        for p in w.params_p:
            p.requires_grad_(False)
        try:
            loss.backward()
        finally:
            for p in w.params_p:
                p.requires_grad_(True)
        if self.cfg.inner_max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.inner_max_grad_norm)
        episode.opt.step()
        for p in params:
            p.grad = None
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
        state = {
            "theta_prime": [p.detach().cpu().clone() for p in params],
            "optimizer": opt,
            "lr": ep.lr,
            "h": ep.h,
            "identifier": ep.identifier,
            "batch": ep.batch,
        }
        if ep.lora is not None:
            state.update(kind="lora", rank=ep.lora.rank, lora=ep.lora.state())
        return state

    def load_state_dict(self, state: dict) -> None:
        params = self.weights.params_p
        with torch.no_grad():
            for p, v in zip(params, state["theta_prime"]):
                copy_into(p, v)
        self.end()
        if state.get("kind") == "lora":
            lora = LoRAAdapters(
                self.weights.unet_p, state["rank"], self.weights.device, tensors=state["lora"]
            )
            opt = self.weights.adamw(lora.params, state["lr"])
            opt.load_state_dict(state["optimizer"])
            self.current = Episode(opt, state["lr"], state["identifier"], state["h"], kind="lora", lora=lora,
                                   batch=state.get("batch", 0))  # fmt: skip
            return
        opt, inner = self._optimizer(state["lr"])
        if inner is not None:
            for p, sd in zip(params, state["optimizer"]):
                inner[p].load_state_dict(sd)
        else:
            opt.load_state_dict(state["optimizer"])
        self.current = Episode(opt, state["lr"], state.get("identifier", 0), state["h"], inner,
                               batch=state.get("batch", 0))  # fmt: skip
