"""The models the rows attack besides the world model and its protections: the from-scratch rows' random
UNet, the world model with one group of UNet parameters taken from it (the ``reset_<part>`` rows), and the
weight average of several protected models (the ``soup`` setting of a variant) and the protection's change scaled
(``delta_scale``: a weighted combination of the world model and a protected one)."""

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


def soup_model(models: list, weights: list[float] | None = None):
    """The first of ``models`` with every floating-point tensor of its UNet (parameters and buffers) the mean
    of theirs (or their sum weighted by ``weights``): a weight average of protections of the same UNet, or, with
    the world model and a protected one weighted 1 - s and s, the protection's change scaled by s; the given
    models are untouched."""
    import torch

    unet = copy.deepcopy(models[0].unet)
    states = [m.unet.state_dict() for m in models]
    w = None if weights is None else torch.tensor(weights, dtype=torch.float64)
    with torch.no_grad():
        for name, t in unet.state_dict().items():
            if t.is_floating_point():
                if w is None:  # the plain mean (as the ninth round measured it)
                    t.copy_(torch.stack([s[name].float() for s in states]).mean(0).to(t.dtype))
                else:
                    t.copy_(
                        torch.tensordot(w, torch.stack([s[name].double() for s in states]), dims=1).to(
                            t.dtype
                        )
                    )
    info = {**models[0].info, "soup": len(models) if weights is None else list(weights)}
    return dataclasses.replace(models[0], unet=unet, info=info, _fingerprint=None)
