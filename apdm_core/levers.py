"""The performance levers of a protection run (README "Performance"): where tensors live and which
kernels run, never what is computed. Used by the simulated-attacker loop (``protect.L2PTrainer``)."""

from __future__ import annotations

import logging

import torch

from .errors import InputError

log = logging.getLogger(__name__)


def make_adamw(config, params, lr: float, device: torch.device, beta1: float = 0.0):
    """The optimizer of ``config.optimizer`` for ``params``, with the kernel of ``adamw_impl`` (``beta1`` > 0 in
    place of adam_beta1)."""
    c = config
    kw = {
        "lr": lr,
        "betas": (beta1 or c.adam_beta1, c.adam_beta2),
        "weight_decay": c.adam_weight_decay,
        "eps": c.adam_epsilon,
    }
    device = params[0].device if params else device
    if c.optimizer == "adamw8bit" and device.type == "cuda":  # an offloaded outer optimizer stays 32-bit
        return require_bitsandbytes(device).optim.AdamW8bit(params, **kw)
    impl = c.adamw_impl
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    if impl == "fused":
        kw["fused"] = True
    else:
        kw["foreach"] = impl == "foreach"
    return torch.optim.AdamW(params, **kw)


def unet_interface(name: str) -> bool:
    """conv_in / conv_out, the timestep embedding, the down/upsamplers, the output norm: every UNet parameter
    outside the ResNet and transformer blocks (README, seventh round)."""
    return ".resnets." not in name and "attentions." not in name


PROTECT_LAYERS = {  # protect_layers -> which UNet parameters the protection changes (by name)
    "all": lambda name: True,
    "attention": lambda name: ".attn1." in name or ".attn2." in name,
    "cross_attention": lambda name: ".attn2." in name,
    # the keys and values of the cross-attention: the only weights that read the text embeddings
    "cross_attention_kv": lambda name: ".attn2.to_k." in name or ".attn2.to_v." in name,
    "cross_attention_interface": lambda name: ".attn2." in name or unet_interface(name),
}


def protected_subset(unet, layers: str) -> list[torch.nn.Parameter]:
    """The trainable parameters of ``unet`` that ``protect_layers=layers`` lets the protection change."""
    keep = PROTECT_LAYERS[layers]
    chosen = [p for n, p in unet.named_parameters() if p.requires_grad and keep(n)]
    if not chosen:
        raise InputError(f"protect_layers={layers!r} selects no parameter of this UNet; use 'all'.")
    return chosen


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pin_parameters(module) -> None:
    """Page-lock a CPU module's parameters (fast, asynchronous host<->GPU copies)."""
    for p in module.parameters():
        p.data = p.data.pin_memory()


def use_xformers(unet, device: torch.device) -> bool:
    """xformers attention when it is importable and we run on CUDA; otherwise keep SDPA (say so)."""
    if device.type != "cuda":
        log.warning("attention='xformers' needs CUDA; using PyTorch SDPA attention on %s.", device)
        return False
    try:
        import xformers  # noqa: F401
    except ImportError:
        log.warning("attention='xformers' but xformers is not installed; using PyTorch SDPA attention.")
        return False
    unet.enable_xformers_memory_efficient_attention()
    return True


def require_bitsandbytes(device: torch.device):
    """The bitsandbytes module for 8-bit AdamW, or an InputError saying what to do."""
    if device.type != "cuda":
        raise InputError(
            f"optimizer='adamw8bit' runs on CUDA only (bitsandbytes); use optimizer='adamw' on {device}."
        )
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise InputError(
            "optimizer='adamw8bit' needs bitsandbytes: `pip install -c constraints.txt bitsandbytes`, "
            "or use optimizer='adamw' (or --preset low-memory)."
        ) from exc
    return bnb
