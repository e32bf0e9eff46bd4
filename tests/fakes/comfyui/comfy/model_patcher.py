"""Fake ModelPatcher: clone / add_patches / get_key_patches / patched weights, ComfyUI's "diff" semantics."""

import copy

import torch


class FakeModelConfig:
    def __init__(self, unet_config):
        self.unet_config = unet_config


class FakeBaseModel(torch.nn.Module):
    """Holds a diffusers UNet as ``diffusion_model`` (ComfyUI's BaseModel holds an LDM UNetModel)."""

    def __init__(self, unet, ldm_unet=None):
        super().__init__()
        self.diffusion_model = unet
        self.model_config = FakeModelConfig({"diffusers_keys": list(unet.state_dict())})
        self.ldm_unet = ldm_unet  # the UNet's tensors in ComfyUI's own (original LDM) names

    def state_dict_for_saving(self, clip_state_dict=None, vae_state_dict=None, clip_vision_state_dict=None):
        """As ComfyUI's BaseModel for an SD1.x model: the UNet under model.diffusion_model., the CLIP's
        clip_l. prefix replaced by cond_stage_model. (SD15.process_clip_state_dict_for_saving, which drops
        text_projection and logit_scale), the VAE under first_stage_model."""
        sd = {"model.diffusion_model." + k: v for k, v in (self.ldm_unet or {}).items()}
        for k, v in (clip_state_dict or {}).items():
            if k.startswith("clip_l.") and k not in (
                "clip_l.transformer.text_projection.weight",
                "clip_l.logit_scale",
            ):
                sd["cond_stage_model." + k[len("clip_l.") :]] = v
        sd.update({"first_stage_model." + k: v for k, v in (vae_state_dict or {}).items()})
        return sd


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.patches = {}

    def clone(self):
        n = ModelPatcher(self.model)  # shares the torch module, as ComfyUI's clone does
        n.patches = {k: v[:] for k, v in self.patches.items()}
        return n

    def model_state_dict(self, filter_prefix=None):
        sd = self.model.state_dict()
        return {k: v for k, v in sd.items() if filter_prefix is None or k.startswith(filter_prefix)}

    def get_key_patches(self, filter_prefix=None):
        return {
            k: [(v, lambda a, **kw: a)] + self.patches.get(k, [])
            for k, v in self.model_state_dict(filter_prefix).items()
        }

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        sd = self.model.state_dict()
        added = []
        for k, v in patches.items():
            if k in sd:
                self.patches.setdefault(k, []).append((strength_patch, v, strength_model, None, None))
                added.append(k)
        return added

    def patched_state_dict(self):
        """The weights ComfyUI would sample with (comfy.lora.calculate_weight for 'diff' patches)."""
        out = {}
        for k, w in self.model.state_dict().items():
            w = copy.deepcopy(w).float()
            for strength, v, strength_model, _offset, _fn in self.patches.get(k, []):
                if strength_model != 1.0:
                    w *= strength_model
                w += strength * v[0].float()
            out[k] = w
        return out
