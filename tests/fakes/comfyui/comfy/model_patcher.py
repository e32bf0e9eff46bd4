"""Fake ModelPatcher: clone / add_patches / get_key_patches / patched weights, ComfyUI's "diff" semantics."""

import copy

import torch


class FakeModelConfig:
    def __init__(self, unet_config):
        self.unet_config = unet_config


class FakeBaseModel(torch.nn.Module):
    """Holds a diffusers UNet as ``diffusion_model`` (ComfyUI's BaseModel holds an LDM UNetModel)."""

    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet
        self.model_config = FakeModelConfig({"diffusers_keys": list(unet.state_dict())})


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
