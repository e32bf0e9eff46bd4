"""The models the rows attack besides the world model and its protections: the from-scratch rows' random
UNet, and the world model with one group of UNet parameters taken from it (the ``reset_<part>`` rows)."""

from __future__ import annotations

import copy
import dataclasses

from .rows import RESETS, SCRATCH_SEED


def scratch_model(model, seed: int):
    """``model`` with its UNet replaced by a randomly initialised one of the same config (seeded)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SCRATCH_SEED + seed)
        unet = UNet2DConditionModel.from_config(model.unet.config)
    unet = unet.to(model.device).requires_grad_(False).eval()
    return dataclasses.replace(model, unet=unet, info={**model.info, "scratch": True}, _fingerprint=None)


def reset_model(model, seed: int, reset: str):
    """``model`` with the UNet parameters of ``RESETS[reset]`` taken from ``scratch_model(model, seed)``."""
    import torch

    keep = RESETS[reset][1]
    fresh = dict(scratch_model(model, seed).unet.named_parameters())
    unet = copy.deepcopy(model.unet)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if keep(name):
                p.copy_(fresh[name])
    return dataclasses.replace(model, unet=unet, info={**model.info, "reset": reset}, _fingerprint=None)
