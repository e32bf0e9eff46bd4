"""Named presets of ProtectConfig: settings on top of the defaults (the paper's). ``apdm protect --preset``,
``ProtectConfig.from_preset``, the page's preset buttons and the ComfyUI preset read them."""

from __future__ import annotations

from typing import Any

# What made protection hold (for a while) in the demo world (README "Protection that holds"): the
# bounded target loss at the attacked weights, a persistent simulated attacker that sees
# resync_every x inner_steps = 400 attack steps, clipped like DreamBooth, the protection gradient at
# every 2nd attack step, only the cross-attention layers changed, and the distillation anchor
# (add anchor_prompts for the classes you want kept). Learning rates stay the paper's (5e-6 on both
# paths, as an SD1.5 DreamBooth attacker uses). Measured on the demo world only, not on SD1.5.
ROBUST: dict[str, Any] = {
    "loss": "target",
    "outer_steps": 100,
    "inner_steps": 20,
    "resync_every": 20,
    "protect_every": 2,
    "protect_layers": "cross_attention",
    "inner_max_grad_norm": 1.0,
    "anchor_weight": 3.0,
}
# robust + the attacker family (the "family" preset below)
FAMILY = {
    **ROBUST,
    "outer_steps": 200,
    "resync_every": 40,
    "lr_personalize_max": 2e-5,
    "attacker_family": ["full", "lora"],
    "lora_ranks": [4, 16],
    "lora_lr": 1e-4,
    "lora_lr_max": 1e-3,
}
# the memory levers that keep the optimizer (the "low-memory" preset below)
LOW_MEMORY = {
    "mixed_precision": "bf16",
    "ref_precision": "bf16",
    "gradient_checkpointing": True,
    "optimizer_in_backward": True,
    "offload_outer": True,
}
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's settings (the defaults).
    "paper": {},
    # What the released reference code (KU-VGI/APDM protect.py) computes: it never zeroes the
    # personalization gradient, applies log-sigmoid per latent element, pairs by directory order.
    "reference": {"accumulation": "protect+personalize", "dpo_reduction": "element", "pair_order": "listdir"},
    # Short runs for a first look in a UI; protection is weaker than the paper's.
    "quick": {"outer_steps": 100, "inner_steps": 10, "num_class_images": 50},
    "robust": ROBUST,  # the levers above
    # robust + the attacker family in the loop (README "Protection that holds"; the demo world's demo
    # preset): every simulated attacker episode is DreamBooth or DreamBooth-LoRA in turn (rank 4 or 16 on
    # the attention projections), its lr drawn log-uniformly up to 4x the attacker's (LoRA: 1e-4 .. 1e-3,
    # what DreamBooth-LoRA scripts use on SD1.5), and each episode lives 40 outer steps (800 attack steps,
    # 2x the standard attack) over 200 outer steps. Measured on the demo world only, not on SD1.5.
    "family": FAMILY,
    # SDXL on a 24 GB GPU (README "SDXL"; by the memory estimate of benchmarks/bench_protect.py --estimate
    # --unet sdxl, not measured on a GPU yet): the family preset's loop with the simulated DreamBooth
    # attacker on the attention layers only, bf16 autocast with a bf16 reference, gradient checkpointing,
    # the attacker's step inside the backward with 8-bit moments, theta and its optimizer in CPU memory.
    # Those two levers cannot run with the family's anchor and gradient clipping, which it drops.
    "sdxl-24gb": {
        **FAMILY,
        "attacker_layers": "attention",
        "anchor_weight": 0.0,
        "inner_max_grad_norm": 0.0,
        **LOW_MEMORY,
        "optimizer": "adamw8bit",
    },
    "thorough": {"outer_steps": 1200, "inner_steps": 20},
    # The paper's settings computed faster on a GPU (README "Performance"): bf16 autocast with fp32
    # master weights, a bf16 reference UNet, channels_last.
    "fast": {"mixed_precision": "bf16", "ref_precision": "bf16", "channels_last": True},
    # fast + everything that saves memory without changing the optimizer (estimate for SD1.5 at
    # 512 px in the README: about 16 GB).
    "low-memory": LOW_MEMORY,
    # low-memory + 8-bit AdamW moments for the simulated attacker (bitsandbytes, CUDA): fits 12 GB
    # for SD1.5 at 512 px by the estimate in the README.
    "low-memory-8bit": {**LOW_MEMORY, "optimizer": "adamw8bit"},
}
