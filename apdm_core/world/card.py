"""The world model's card (MODEL_CARD.md), written from the pretraining record."""

from __future__ import annotations

from . import render


def _command(cfg: dict, defaults: dict) -> str:
    """The command that reproduces the model (run-time only settings left out)."""
    flags = [
        f"--{k.replace('_', '-')} {v}"
        for k, v in cfg.items()
        if defaults.get(k) != v and k not in ("threads", "vae_from")
    ]
    return " ".join(["apdm world pretrain --out MODEL_DIR", *flags])


def _reuse_note(record: dict) -> str:
    source = record["timing"].get("vae", {}).get("reused_from")
    if not source:
        return ""
    return (
        f"\nThis model's VAE stage was reused from an earlier run of the same recipe (`--vae-from {source}`,"
        "\nsame seed and settings, so the same VAE stage); its cost is included below.\n"
    )


def model_card(record: dict, defaults: dict) -> str:
    """The model card of a pretraining ``record``; ``defaults`` = the recipe's default settings
    (the command shown names only what differs)."""
    cfg = record["config"]
    vae_log, unet_log = record["vae"]["log"], record["unet"]["log"]
    timing = record["timing"]
    total_cpu = sum(v["cpu_s"] for v in timing.values())
    total_wall = sum(v["wall_s"] for v in timing.values())
    rows = "\n".join(f"| {k} | {v['cpu_s']:.0f} | {v['wall_s']:.0f} |" for k, v in timing.items())
    xl = cfg.get("arch", "sd") == "sdxl"
    layout = (
        "the SDXL layout (diffusers `UNet2DConditionModel` with SDXL's `text_time` added conditioning:\n"
        "the pooled embedding and the six size/crop ids; no attention at the first level; two text\n"
        "encoders, `CLIPTextModel` + `CLIPTextModelWithProjection`, whose token states are concatenated;\n"
        "`AutoencoderKL`, `DDIMScheduler`"
        if xl
        else "the Stable Diffusion layout (diffusers\n`UNet2DConditionModel`, `AutoencoderKL`, `CLIPTextModel` + "
        "`CLIPTokenizer`, `DDIMScheduler`"
    )
    return f"""# APDM demo world model{" (SDXL-shaped)" if xl else ""}

A tiny text-to-image latent diffusion model with {layout},
epsilon prediction, SD's scaled-linear noise schedule), pretrained from scratch on the
procedural demo world of `apdm_core.world`. It exists so that protection and personalization
can be run and *measured* on a CPU in minutes; it knows nothing but this world.

- Images: {render.SIZE}x{render.SIZE} RGB; latents 4 x {render.SIZE // 4} x {render.SIZE // 4} (the VAE downsamples 4x).
- Classes: {", ".join(render.CLASSES)}. Prompts: "a photo of <class>", optionally with a colour
  ({", ".join(render.COLOR_NAMES)}) and "with <colour> <pattern>" ({", ".join(render.PATTERNS)}).
  The outline (none / dark / light) and fine details of an individual are never named.
- The identifier `{render.IDENTIFIER}` is a single token of the vocabulary that appears in no
  pretraining caption (like a rare token of CLIP's vocabulary).
- Pretraining individuals come from their own seed namespace: none of them is a public
  subject (`apdm world subject --seed N`).

## Reproduce

```bash
{_command(cfg, defaults)}
```

{_reuse_note(record)}
Deterministic for a given seed, torch version and thread count (CPU float reductions depend
on the thread count). This model: torch {record["torch"]}, {record["threads"]} thread(s).

## Training

| stage | what | steps x batch | lr |
| --- | --- | --- | --- |
| data | {cfg["subjects"]} individuals x {cfg["photos"]} photos = {record["images"]} images, random captions | | |
| VAE | MSE + {cfg["vae_kl"]} x KL per element | {cfg["vae_steps"]} x {cfg["vae_batch"]} | {cfg["vae_lr"]} (cosine) |
| UNet + text encoder{"s" if xl else ""} | noise prediction, {cfg["uncond"]:.0%} empty captions, EMA {cfg["ema_decay"]} | {cfg["unet_steps"]} x {cfg["unet_batch"]} | {cfg["unet_lr"]} / {cfg["text_lr"]} (cosine) |

Losses (mean over the last 50 steps): VAE MSE {vae_log[-1]["mse"]:.4f} (first 50: {vae_log[0]["mse"]:.4f}),
KL {vae_log[-1]["kl"]:.3f}; UNet {unet_log[-1]["loss"]:.4f} (first 50: {unet_log[0]["loss"]:.4f}).
VAE scaling factor {record["vae"]["scaling_factor"]:.4f}. The full loss logs are in `apdm_world.json`.

## Cost

| stage | CPU s | wall s |
| --- | --- | --- |
{rows}
| total | {total_cpu:.0f} | {total_wall:.0f} |

Measured on {record["machine"]} with {record["threads"]} torch thread(s), on a machine shared with
other jobs (wall time is inflated by them; CPU time is what the run itself used).
"""
