"""Where the loop's weights live and how gradients reach them: theta, theta' and the reference.

The performance levers of ``ProtectConfig`` (README "Performance") change where tensors live and
which kernels run, never the losses or the order of random draws:

- theta' is a persistent copy, refilled from theta at every outer step (no deepcopy);
- the protection gradient is accumulated by letting the backward add straight into the
  accumulator (theta'.grad aliases it), with no separate gradient buffer;
- ``offload_outer``: theta and the outer AdamW live in CPU memory;
- ``ref_precision``, ``mixed_precision``, ``channels_last``, ``attention``,
  ``gradient_checkpointing``, ``compile_unet`` and ``adamw_impl`` pick kernels/precision;
- ``parallel`` splits the batch over processes (DDP) or also shards the UNets (FSDP).
"""

from __future__ import annotations

import copy
import logging

import torch

from ..config import ProtectConfig
from ..errors import InputError
from ..levers import DTYPES, PROTECT_LAYERS, make_adamw, pin_parameters, protected_subset, use_xformers
from ..models import SDModel
from ..parallel import Parallel, copy_into, full_tensor
from ..training import make_forward

log = logging.getLogger(__name__)


def check_parallel(config: ProtectConfig, parallel: Parallel) -> None:
    """Refuse (before any pairs are made) what does not run with several processes."""
    if not parallel.active:
        return
    if config.resync_every > 1 or config.anchor_weight > 0:
        raise InputError(
            "resync_every > 1 and anchor_weight > 0 run in one process only; launch without accelerate."
        )
    from ..methods import get_method

    if get_method(config.method).uses_theta_loss(config):
        raise InputError(
            f"method={config.method!r} trains a term at theta on the compute device in one process "
            "(behaviour_weight > 0): turn offload_outer off and launch without accelerate."
        )
    if config.conflict_weight > 0:
        raise InputError(
            "conflict_weight > 0 (a double backward) runs in one process only; launch without accelerate."
        )
    if config.hypergradient:
        raise InputError(
            "hypergradient (an unrolled double backward) runs in one process only; launch without accelerate."
        )
    if config.tail_average and parallel.kind == "fsdp":
        raise InputError(
            "tail_average > 0 averages whole weights, which distributed='fsdp' shards; use distributed='ddp' "
            "or one process."
        )
    if config.optimizer_in_backward:
        log.warning("optimizer_in_backward is ignored with several processes (the library syncs gradients).")
    if config.channels_last and parallel.kind == "fsdp":
        log.warning("channels_last is ignored with distributed='fsdp' (shards are row-major).")


class Weights:
    """theta (the protected weights, one update per outer step), theta' (the simulated attacker, a
    persistent buffer on the compute device) and the frozen reference, placed by the levers."""

    def __init__(
        self,
        config: ProtectConfig,
        model: SDModel,
        device: torch.device,
        parallel: Parallel,
        reference: SDModel | None = None,
    ) -> None:
        self.cfg, self.model, self.device, self.parallel = config, model, device, parallel
        distributed = parallel.active
        fsdp = distributed and parallel.kind == "fsdp"
        self.channels_last = config.channels_last and not fsdp
        self.in_backward = config.optimizer_in_backward and not distributed
        if self.in_backward and not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
            raise InputError(
                f"optimizer_in_backward needs torch >= 2.2 (this is torch {torch.__version__}); "
                "turn it off (or use the 'fast' preset) or update torch."
            )
        # the backward adds the protection gradient straight into the accumulator, except where a
        # distributed wrapper owns .grad (DDP/FSDP write their averaged gradient there)
        self.alias_grads = not distributed
        self.outer_device = torch.device("cpu") if (config.offload_outer or fsdp) else device
        base = model.unet
        base.requires_grad_(False).eval()
        self.unet = copy.deepcopy(base).to(self.outer_device).requires_grad_(True).train()  # theta
        if self.channels_last:  # same layout as theta' so the accumulated gradient applies as is
            self.unet.to(memory_format=torch.channels_last)
        if self.outer_device.type == "cpu" and device.type == "cuda":
            pin_parameters(self.unet)  # faster copies theta -> theta' every outer step
        self.unet_p = self._prepare(copy.deepcopy(base).to(device), trained=True)  # theta'
        if config.attacker_layers != "all":  # the attacker trains (and theta accumulates) these layers only
            keep = PROTECT_LAYERS[config.attacker_layers]
            for module in (self.unet, self.unet_p):
                for name, p in module.named_parameters():
                    p.requires_grad_(keep(name))
        self._base_device = None
        # the frozen reference: the input model, or the original it was protected from (reference_model)
        self.ref_unet, ref_dtype = self._reference(base if reference is None else reference.unet, fsdp)
        self.run_p = parallel.wrap_trained(self.unet_p)  # DDP wrapper / sharded in place
        self.ref_unet = parallel.wrap_frozen(self.ref_unet)
        self.run_ref = self.ref_unet
        if config.compile_unet:
            self.run_p, self.run_ref = torch.compile(self.run_p), torch.compile(self.ref_unet)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.params_p = [p for p in self.unet_p.parameters() if p.requires_grad]
        self.accum = [torch.zeros_like(p) for p in self.params_p]
        self.protected_params = protected_subset(self.unet, config.protect_layers)
        index = {id(p): k for k, p in enumerate(self.params)}
        # (theta's protected weights, their theta' counterparts)
        self.protected_pairs = [
            (p, self.params_p[index[id(p)]]) for p in self.protected_params if id(p) in index
        ]
        self.forward = make_forward(device, config.mixed_precision)
        ref_precision = config.ref_precision if ref_dtype != torch.float32 else config.mixed_precision
        self.forward_ref = make_forward(device, ref_precision)
        self._grad_buffers: list[torch.Tensor] | None = None
        self._alias_checked = False

    def _reference(self, base, fsdp: bool):
        """The frozen reference: the original weights (a copy when a lever would change the module)."""
        cfg = self.cfg
        ref_dtype = DTYPES[cfg.ref_precision]
        as_is = not (self.channels_last or fsdp or cfg.compile_unet or cfg.attention != "sdpa")
        if ref_dtype == torch.float32 and as_is:
            return base, ref_dtype
        ref = self._prepare(copy.deepcopy(base).to(self.device, ref_dtype), trained=False)
        if self.device.type == "cuda":  # the fp32 original is not needed on the GPU meanwhile
            self._base_device, self._moved = self.device, base
            base.to("cpu")
            torch.cuda.empty_cache()
        return ref, ref_dtype

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

    def adamw(self, params, lr: float, beta1: float = 0.0):
        return make_adamw(self.cfg, params, lr, self.device, beta1)

    # --- theta' and the accumulator -------------------------------------------------------------
    def refill_prime(self) -> None:
        """theta' <- theta, in place (theta may live in CPU memory, theta' may be sharded); accumulator 0."""
        with torch.no_grad():
            for p_prime, p in zip(self.params_p, self.params):
                copy_into(p_prime, p)
        self.zero_accum()

    def zero_accum(self) -> None:
        for a in self.accum:
            a.zero_()

    def clear_prime_grads(self) -> None:
        for p in self.params_p:
            p.grad = None

    def add_prime_grads_to_accum(self) -> None:
        with torch.no_grad():
            for a, p in zip(self.accum, self.params_p):
                if p.grad is not None:
                    a.add_(p.grad)

    def accumulate(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` at theta', its gradient added into the accumulator."""
        if not self.alias_grads:
            loss.backward()
            self.add_prime_grads_to_accum()
            return
        for p, a in zip(self.params_p, self.accum):  # the backward adds into the accumulator itself
            p.grad = a
        loss.backward()
        if not self._alias_checked:
            self.check_accumulation()
        self.clear_prime_grads()

    def check_accumulation(self) -> None:
        """Once per run: the backward added into the accumulator in place (a torch that replaced
        ``.grad`` instead would leave the accumulator silently zero: a protection that does nothing)."""
        self._alias_checked = True
        replaced = [
            i
            for i, (p, a) in enumerate(zip(self.params_p, self.accum))
            if p.grad is not None and p.grad.data_ptr() != a.data_ptr()
        ]
        if replaced:
            raise RuntimeError(
                "The protection gradient did not reach the accumulator (torch replaced .grad instead of adding "
                f"into it, for {len(replaced)} tensors); please report this with your torch version "
                f"({torch.__version__})."
            )

    # --- theta ---------------------------------------------------------------------------------
    def accumulated_into_theta_grad(self) -> None:
        """theta.grad <- the accumulated protection gradient (the accumulator itself where it lives with theta)."""
        if self._grad_buffers is None:
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

    def clear_theta_grads(self) -> None:
        for p in self.params:  # also the gradients of layers protect_layers leaves as they are
            p.grad = None

    def follow_theta(self, before: list[torch.Tensor]) -> None:
        """theta' += (theta - ``before``): a persistent attacker stays "theta after its attack steps"."""
        with torch.no_grad():
            for p_prime, p, b in zip(self.params_p, self.params, before):
                p_prime.add_((p - b).to(p_prime.device))

    def protected_snapshot(self) -> list[torch.Tensor]:
        """theta's protected weights now (those protected_pairs follows), for follow_protected later."""
        return [p.detach().clone() for p, _ in self.protected_pairs]

    def follow_protected(self, before: list[torch.Tensor]) -> None:
        """theta' += (theta - ``before``) on the protected weights (``before``: a protected_snapshot)."""
        with torch.no_grad():
            for (p, p_prime), b in zip(self.protected_pairs, before):
                p_prime.add_((p - b).to(p_prime.device))

    def finish(self):
        """The protected UNet as a plain module on the compute device; the base model back where it was."""
        unet = self.unet.to(self.device, memory_format=torch.contiguous_format)
        if self._base_device is not None:
            self._moved.to(self._base_device)
        return unet
