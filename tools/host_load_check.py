"""What a real host makes of a checkpoint file: run it with the host's own python from the host's folder.

    cd ComfyUI && PYTHONPATH=$PWD comfy-venv/bin/python /path/to/tools/host_load_check.py comfyui FILE
    cd stable-diffusion-webui && PYTHONPATH=$PWD a1111-venv/bin/python /path/to/tools/host_load_check.py a1111 FILE

ComfyUI: ``comfy.sd.load_checkpoint_guess_config`` (what Load Checkpoint calls) on the CPU: the model
class it detects, whether its UNet tensors equal the file's, and one prompt through its CLIP.
A1111/Forge: ``sd_models_config.guess_model_config_from_state_dict`` (the config the webui loads the
file with). Used for the README's SDXL real-host check; needs no GPU.
"""

from __future__ import annotations

import sys
import time


def comfyui(path: str) -> None:
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.sd
    import torch
    from safetensors import safe_open

    t = time.time()
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)[:3]
    print(f"ComfyUI: model {type(model.model).__name__}, clip {type(clip.cond_stage_model).__name__}, "
          f"vae {vae is not None}, {time.time() - t:.0f} s")  # fmt: skip
    sd = model.model.diffusion_model.state_dict()
    with safe_open(path, "pt") as f:
        same = sum(torch.equal(v.to(f.get_tensor("model.diffusion_model." + k).dtype),
                               f.get_tensor("model.diffusion_model." + k)) for k, v in sd.items())  # fmt: skip
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of sks dog"), return_pooled=True)
    print(f"ComfyUI: UNet tensors equal to the file {same}/{len(sd)}; CLIP -> {tuple(cond.shape)}, "
          f"pooled {tuple(pooled.shape)}")  # fmt: skip


def a1111(path: str) -> None:
    sys.argv = [sys.argv[0], "--skip-torch-cuda-test", "--no-download-sd-model"]
    from modules import sd_models_config
    from safetensors import safe_open

    with safe_open(
        path, "pt"
    ) as f:  # the keys the guess reads (the UNet's first conv, label_emb, text encoders)
        sd = {k: f.get_tensor(k) for k in f.keys()
              if not k.startswith("model.diffusion_model.") or "input_blocks.0.0" in k or "label_emb" in k}  # fmt: skip
    print("A1111: config", sd_models_config.guess_model_config_from_state_dict(sd, path))


if __name__ == "__main__":
    {"comfyui": comfyui, "a1111": a1111}[sys.argv[1]](sys.argv[2])
