"""Check the MODEL patches against the real ComfyUI code (outside CI: needs a ComfyUI checkout + its venv).

    COMFYUI=/path/to/ComfyUI
    $COMFYUI/../comfy-venv/bin/python tests/check_real_comfyui.py $COMFYUI

It builds the tiny SD-shaped diffusers UNet of the test suite, the equivalent ComfyUI UNetModel
(SD1.x topology at a tiny width) inside a real ModelPatcher, and checks that
1. ComfyUI's own diffusers -> LDM key map (comfy.utils.unet_to_diffusers) covers every tensor,
   and the mapped weights load into ComfyUI's UNetModel with strict=True;
2. both UNets predict the same noise (same architecture, same weights);
3. nodes/comfy_model.patched_model on a real ModelPatcher, once ComfyUI patches the weights
   for sampling, gives exactly the protected UNet's weights and predictions, leaves the
   input MODEL untouched, and unpatching restores it.
Prints one line per check; exits 1 on the first failure.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(comfy_dir: str) -> int:
    sys.path.insert(0, comfy_dir)
    sys.path.insert(1, str(ROOT))
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # as `main.py --cpu`; set before comfy.model_management loads
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from diffusers import UNet2DConditionModel

    from apdm_core.tiny import tiny_configs

    spec = importlib.util.spec_from_file_location("apdm_comfy_model", ROOT / "nodes" / "comfy_model.py")
    comfy_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(comfy_model)

    # the test suite's tiny UNet, with 32 norm groups: ComfyUI's LDM UNet hard-codes GroupNorm(32)
    unet_kwargs = {**tiny_configs()["unet"], "norm_num_groups": 32}
    torch.manual_seed(0)
    base = UNet2DConditionModel(**unet_kwargs).eval()
    cfg = base.config
    unet_config = {  # ComfyUI's description of the same SD1.x-style UNet (what model_detection would find)
        "in_channels": 4, "out_channels": 4, "model_channels": cfg.block_out_channels[0],
        "channel_mult": [c // cfg.block_out_channels[0] for c in cfg.block_out_channels],
        "num_res_blocks": [cfg.layers_per_block] * len(cfg.block_out_channels),
        "transformer_depth": [1 if "CrossAttn" in t else 0 for t in cfg.down_block_types
                              for _ in range(cfg.layers_per_block)],
        "transformer_depth_output": [1 if "CrossAttn" in t else 0 for t in reversed(cfg.up_block_types)
                                     for _ in range(cfg.layers_per_block + 1)],
        "transformer_depth_middle": 1, "context_dim": cfg.cross_attention_dim, "use_linear_in_transformer": False,
        "adm_in_channels": None, "use_temporal_attention": False, "num_heads": cfg.attention_head_dim,
        "num_head_channels": -1, "dims": 2, "use_checkpoint": False, "image_size": 32, "legacy": False,
        "use_spatial_transformer": True, "dtype": torch.float32,
    }  # fmt: skip
    checks = 0

    def check(ok: bool, what: str) -> None:
        nonlocal checks
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            sys.exit(1)
        checks += 1

    mapping = comfy.utils.unet_to_diffusers(unet_config)
    ours = base.state_dict()
    check(all(k in mapping for k in ours), f"unet_to_diffusers maps all {len(ours)} diffusers UNet tensors")

    model_config = comfy.supported_models.SD15(dict(unet_config))
    model_config.unet_config = dict(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    bm = comfy.model_base.BaseModel(model_config, device=torch.device("cpu"))
    ldm = {mapping[k]: v for k, v in ours.items()}
    missing, unexpected = bm.diffusion_model.load_state_dict(ldm, strict=False)
    check(
        not missing and not unexpected,
        f"mapped weights load into ComfyUI's UNetModel (missing {missing[:3]}, unexpected {unexpected[:3]})",
    )

    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 77, cfg.cross_attention_dim)
    with torch.no_grad():
        want = base(x, t, encoder_hidden_states=ctx).sample
        got = bm.diffusion_model(x, timesteps=t, context=ctx)
    check(
        torch.allclose(want, got, atol=1e-4),
        f"same prediction (max diff {float((want - got).abs().max()):.2e})",
    )

    protected = UNet2DConditionModel(**unet_kwargs).eval()
    protected.load_state_dict(ours)
    with torch.no_grad():
        for p in protected.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    patcher = comfy.model_patcher.ModelPatcher(
        bm, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    )
    before = {k: v.clone() for k, v in bm.state_dict().items()}
    patched = comfy_model.patched_model(patcher, protected, 1.0)
    check(
        len(patched.patches) == len(ours) and not patcher.patches,
        "one diff patch per tensor, on the clone only",
    )
    patched.patch_model()
    sd = bm.diffusion_model.state_dict()
    prot = protected.state_dict()
    worst = max(float((sd[mapping[k]] - prot[k]).abs().max()) for k in prot)
    check(worst < 1e-6, f"patched MODEL weights == protected UNet (max diff {worst:.2e})")
    with torch.no_grad():
        want = protected(x, t, encoder_hidden_states=ctx).sample
        got = bm.diffusion_model(x, timesteps=t, context=ctx)
    check(torch.allclose(want, got, atol=1e-4), "patched MODEL predicts like the protected UNet")
    patched.unpatch_model()
    check(all(torch.equal(before[k], v) for k, v in bm.state_dict().items()), "unpatching restores the MODEL")
    half = comfy_model.patched_model(patcher, protected, 0.5)
    half.patch_model()
    worst = max(
        float((bm.diffusion_model.state_dict()[mapping[k]] - (prot[k] + ours[k]) / 2).abs().max())
        for k in prot
    )
    half.unpatch_model()
    check(worst < 1e-6, f"strength 0.5 gives the midpoint (max diff {worst:.2e})")
    print(f"{checks} checks passed against ComfyUI at {comfy_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
