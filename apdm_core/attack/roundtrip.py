"""Attacks on the protection itself that change no training: the weights through a lower precision.

An attacker who receives a protected checkpoint may save it in float16 or quantize it to 8 bits
before fine-tuning (as LLM unlearning studies found, quantization can undo small weight changes).
``round_trip`` returns a copy of a UNet whose float weights went through that format and back.
"""

from __future__ import annotations

import copy

import torch

ROUND_TRIPS = ("fp16", "int8")


def round_trip(unet: torch.nn.Module, kind: str) -> torch.nn.Module:
    """A copy of ``unet`` with every float parameter through ``kind`` and back to its own dtype:
    'fp16' (half precision, as a checkpoint saved in float16), or 'int8' (symmetric per-output-channel
    absmax quantization of every weight with two or more dimensions, as 8-bit weight-only
    quantization does; biases and norms stay)."""
    if kind not in ROUND_TRIPS:
        raise ValueError(f"unknown round trip {kind!r}; one of {', '.join(ROUND_TRIPS)}")
    out = copy.deepcopy(unet)
    with torch.no_grad():
        for p in out.parameters():
            if not p.is_floating_point():
                continue
            if kind == "fp16":
                p.copy_(p.half().to(p.dtype))
            elif p.dim() >= 2:
                p.copy_(quantize_int8(p))
    return out


def quantize_int8(w: torch.Tensor) -> torch.Tensor:
    """``w`` after 8-bit symmetric quantization with one scale per output channel (dim 0)."""
    flat = w.reshape(w.shape[0], -1).float()
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return (torch.round(flat / scale).clamp(-127, 127) * scale).reshape(w.shape).to(w.dtype)
