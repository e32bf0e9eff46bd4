"""The protection as weight patches on ComfyUI's own MODEL (as comfy_extras/nodes_model_merging.py does).

``clone()`` shares the torch module with its input, so the protected weights are never written
into it: each changed UNet tensor becomes a "diff" patch (protected - original) on the clone,
applied by ComfyUI when it loads the model for sampling, undone when it unloads it. The
diffusers -> original (LDM) key names come from ComfyUI itself (``comfy.utils.unet_to_diffusers``).
"""

from __future__ import annotations

import logging

import torch

from apdm_core.errors import InputError

log = logging.getLogger("apdm.comfyui")
PREFIX = "diffusion_model."
UNRELATED_CHANGE = 0.2  # relative change above which the MODEL is clearly not the protected model's base


def protection_patches(comfy_model, unet) -> dict[str, tuple[torch.Tensor]]:
    """{ComfyUI key: (protected - original,)} for every UNet tensor that differs."""
    import comfy.utils

    unet_config = getattr(getattr(comfy_model.model, "model_config", None), "unet_config", None) or {}
    to_ldm = comfy.utils.unet_to_diffusers(unet_config)  # diffusers key -> LDM key
    originals = comfy_model.get_key_patches(PREFIX)  # key -> [(original weight, convert), *patches]
    ours = unet.state_dict()
    missing = [k for k in ours if PREFIX + to_ldm.get(k, "?") not in originals]
    if not to_ldm or missing:
        raise InputError(
            "The MODEL input is not the same kind of Stable Diffusion UNet as the protected model "
            f"({len(missing)} of {len(ours)} tensors have no counterpart); connect the MODEL of a Load "
            "Checkpoint node that loads the checkpoint you protected."
        )
    patches, change, norm = {}, 0.0, 0.0
    for key, value in ours.items():
        original = originals[PREFIX + to_ldm[key]][0][0]
        if original.shape != value.shape:
            raise InputError(
                f"UNet tensor {key}: MODEL has shape {tuple(original.shape)}, the protected model "
                f"{tuple(value.shape)}; connect the MODEL of the checkpoint you protected."
            )
        diff = value.detach().to("cpu", torch.float32) - original.detach().to("cpu", torch.float32)
        change += float(diff.pow(2).sum())
        norm += float(original.detach().float().pow(2).sum())
        if diff.any():
            patches[PREFIX + to_ldm[key]] = (diff,)
    if norm and (change / norm) ** 0.5 > UNRELATED_CHANGE:
        log.warning(
            "APDM: the MODEL differs from the protected UNet by %.0f%%: is it the checkpoint that was "
            "protected? The output MODEL has the protected weights either way.",
            100 * (change / norm) ** 0.5,
        )
    return patches


def patched_model(comfy_model, unet, strength: float = 1.0):
    """A clone of ``comfy_model`` that samples with ``unet``'s weights (``strength`` 1) or a blend."""
    patched = comfy_model.clone()
    if strength:
        patched.add_patches(protection_patches(comfy_model, unet), strength, 1.0)
    return patched


def graph_checkpoint(comfy_model, clip, vae, name: str):
    """ComfyUI's MODEL/CLIP/VAE as the engine's checkpoint in memory: what ComfyUI's own Save Checkpoint
    would write for them (comfy.sd.save_checkpoint): the models loaded through ComfyUI's model management
    with their patches (LoRAs, merges) applied, ``state_dict_for_saving`` in the original key layout."""
    import comfy.model_management

    from apdm_core.checkpoint import CheckpointFile

    comfy.model_management.load_models_gpu([comfy_model, clip.load_model()], force_patch_weights=True)
    state = comfy_model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    return CheckpointFile.from_state_dict(state, name)  # CPU copies: ComfyUI's own weights stay untouched
