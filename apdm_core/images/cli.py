"""``apdm protect-images``: protect the photos themselves (ASPL or LDU)."""

from __future__ import annotations

import argparse


def cmd_protect_images(args: argparse.Namespace) -> int:
    from ..cli import config_from_args
    from ..errors import APDMError
    from ..progress import tqdm_callback
    from .config import ImageProtectConfig
    from .run import protect_images

    config = config_from_args(args, ImageProtectConfig)
    for name, what in (
        ("model", "a diffusers folder or .safetensors checkpoint: the surrogate"),
        ("images", "a folder of the photos to protect"),
        ("output", "a new folder for the PNGs"),
    ):
        if not getattr(config, name):
            raise APDMError(f"--{name if name != 'output' else 'out'} is required ({what}).")
    result = protect_images(
        config,
        progress=tqdm_callback("protect-images"),
        resume=args.resume,
        overwrite=args.overwrite,
        restart=args.restart,
    )
    if result.cancelled:
        print(
            f"stopped after {result.steps_done} iterations; state saved to {result.state_path} "
            "(continue with --resume)"
        )
        return 130
    worst = min(result.metrics, key=lambda m: m["psnr"])
    print(
        f"{len(result.images)} protected photos written to {result.output} ({config.method}, budget "
        f"{config.budget_levels}/255, {result.steps_done} iterations, {result.seconds:.1f} s); lowest PSNR "
        f"{worst['psnr']:.1f} dB, SSIM {worst['ssim']:.3f}"
    )
    return 0


def register_cli(sub) -> None:
    from ..cli import add_config_arguments
    from .config import ImageProtectConfig

    p = sub.add_parser(
        "protect-images", help="Protect photos against personalization (ASPL or LDU perturbations)."
    )
    p.add_argument("--config", help="Load settings from a JSON/YAML file of ImageProtectConfig fields.")
    p.add_argument(
        "--resume", action="store_true", help="Continue from the state file of an interrupted run."
    )
    p.add_argument(
        "--restart", action="store_true", help="Start over although a state file exists (it is replaced)."
    )
    p.add_argument(
        "--overwrite", action="store_true", help="Replace an existing output folder (written by apdm)."
    )
    add_config_arguments(p, ImageProtectConfig)
    p.set_defaults(func=cmd_protect_images)
