"""``apdm world ...``: draw subjects, sample the world model, pretrain it, train the evaluator."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from ..errors import InputError


def register_cli(subparsers) -> None:
    world = subparsers.add_parser("world", help="The built-in demo world (subjects, tiny model, evaluator).")
    sub = world.add_subparsers(dest="world_command", required=True)

    s = sub.add_parser(
        "subject", help="Write photos of one subject of the world (a new individual per seed)."
    )
    s.add_argument(
        "--seed", type=int, required=True, help="The subject's seed (any integer: a new individual)."
    )
    s.add_argument("--count", type=int, default=4, help="Number of photos (default: 4).")
    s.add_argument(
        "--start", type=int, default=0, help="Index of the first photo (other photos, same subject)."
    )
    s.add_argument("--class", dest="cls", default=None, help="Force the class (ball, box, star, kite).")
    s.add_argument("--out", required=True, help="Folder for the photos and subject.json.")
    s.add_argument("--overwrite", action="store_true", help="Replace photos of the same names.")
    s.set_defaults(func=cmd_subject)

    g = sub.add_parser("sample", help="Generate a grid of images from the world model (or any model folder).")
    g.add_argument("--prompt", required=True, help='e.g. "a photo of ball" or "a photo of sks ball".')
    g.add_argument("--model", default="", help="Model folder (default: the shipped world model).")
    g.add_argument("--count", type=int, default=16)
    g.add_argument("--steps", type=int, default=25, help="DDIM steps (default: 25).")
    g.add_argument("--guidance", type=float, default=4.0, help="Classifier-free guidance (default: 4).")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, help="PNG file for the grid.")
    g.add_argument("--overwrite", action="store_true")
    g.set_defaults(func=cmd_sample)

    from .pretrain import PretrainConfig

    p = sub.add_parser("pretrain", help="Pretrain the world model from scratch (the shipped one: defaults).")
    p.add_argument("--out", required=True, help="New folder for the diffusers model.")
    p.add_argument("--overwrite", action="store_true")
    for f in fields(PretrainConfig):
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            help=f"(default: {f.default})",
        )
    p.set_defaults(func=cmd_pretrain)

    e = sub.add_parser("train-evaluator", help="Train the identity evaluator (the shipped one: defaults).")
    e.add_argument("--out", required=True, help="New .safetensors file.")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--subjects", type=int, default=2000, help="Training individuals (default: 2000).")
    e.add_argument("--photos", type=int, default=3, help="Photos per individual (default: 3).")
    e.add_argument("--steps", type=int, default=2000, help="Training steps (default: 2000).")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument(
        "--degenerate",
        type=int,
        default=3000,
        help="Degenerate images (noise, shuffled tiles, random-UNet samples) for the object head "
        "(default: 3000; 0 = no object head, the evaluator before it existed).",
    )
    e.add_argument(
        "--model",
        default="",
        help="World model for the VAE round trip and the random-UNet samples (default: the shipped one).",
    )
    e.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default).")
    e.set_defaults(func=cmd_train_evaluator)


def cmd_subject(args: argparse.Namespace) -> int:
    from ..fileio import atomic_write_text, check_target
    from . import render

    if args.count < 1:
        raise InputError("--count must be >= 1.")
    try:
        subject = render.make_subject(args.seed, cls=args.cls)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    out = Path(args.out)
    paths = [out / f"{subject.name}_{i:02d}.png" for i in range(args.start, args.start + args.count)]
    for path in paths:
        check_target(path, args.overwrite)
    images = render.photos(subject, args.count, start=args.start)
    for path, im in zip(paths, images):
        _save_png(im, path, args.overwrite)
    info = {
        **subject.to_dict(),
        "instance_prompt": render.instance_prompt(subject.cls),
        "class_prompt": render.class_prompt(subject.cls),
        "description": subject.describe(),
    }
    atomic_write_text(out / "subject.json", json.dumps(info, indent=1))
    print(
        f"{len(paths)} photos of subject {args.seed} ({subject.describe()}, outline {subject.outline}) in {out}"
    )
    print(f'instance prompt: "{info["instance_prompt"]}"  class prompt: "{info["class_prompt"]}"')
    return 0


def _save_png(image, path: Path, overwrite: bool) -> None:
    import io

    from ..fileio import atomic_write_bytes

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue(), overwrite=overwrite)


def cmd_sample(args: argparse.Namespace) -> int:
    from ..fileio import check_target
    from ..loading import load_model
    from ..pairs import sample_images
    from . import WORLD_MODEL_DIR, load_world_model
    from .render import grid

    out = Path(args.out)
    check_target(out, args.overwrite, (Path(args.model),) if args.model else ())
    model = load_model(args.model) if args.model else load_world_model()
    size = model.native_resolution
    seeds = list(range(args.seed, args.seed + args.count))
    images = sample_images(model, args.prompt, seeds, size, args.steps, args.guidance, batch_size=16)
    _save_png(grid(images), out, args.overwrite)
    print(f'{len(images)} images of "{args.prompt}" from {args.model or WORLD_MODEL_DIR} -> {out}')
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ..progress import tqdm_callback
    from .pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    out = pretrain(args.out, cfg, progress=tqdm_callback("world"), overwrite=args.overwrite)
    record = json.loads((out / "apdm_world.json").read_text())
    timing = ", ".join(
        f"{k} {v['cpu_s']:.0f} s cpu / {v['wall_s']:.0f} s wall" for k, v in record["timing"].items()
    )
    print(f"world model written to {out} ({timing})")
    return 0


def cmd_train_evaluator(args: argparse.Namespace) -> int:
    import torch

    from ..fileio import check_target
    from ..progress import tqdm_callback
    from .evaluator import save_evaluator, train_evaluator

    check_target(Path(args.out), args.overwrite, (Path(args.model),) if args.model else ())
    if args.threads:
        torch.set_num_threads(args.threads)
    model = None
    if args.degenerate:
        from ..loading import load_model
        from . import load_world_model

        model = load_model(args.model) if args.model else load_world_model()
    evaluator, report = train_evaluator(
        subjects=args.subjects,
        photos=args.photos,
        steps=args.steps,
        seed=args.seed,
        degenerate=args.degenerate,
        model=model,
        progress=tqdm_callback("world"),
    )
    save_evaluator(evaluator, args.out, overwrite=args.overwrite)
    print(f"evaluator written to {args.out}")
    print(json.dumps({k: v for k, v in report.items() if k != "train"}, indent=1))
    return 0
