"""Fake comfy.sd: CLIP and VAE as ComfyUI hands them between nodes (state dicts in ComfyUI's own names)."""


class CLIP:
    def __init__(self, state_dict, patcher=None):
        self.state = state_dict  # keys as ComfyUI's SD1 ClipModel: clip_l.transformer.text_model....
        self.patcher = patcher if patcher is not None else object()

    def load_model(self):
        return self.patcher

    def get_sd(self):
        return dict(self.state)


class VAE:
    def __init__(self, state_dict):
        self.state = state_dict  # keys of the AutoencoderKL: encoder..., decoder..., quant_conv...

    def get_sd(self):
        return dict(self.state)
