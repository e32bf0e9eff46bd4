"""``apdm export`` and ``apdm inspect``: convert or export a checkpoint, show its type and APDM metadata."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import InputError
from .export import (
    DTYPES,
    format_inspection,
    inspect_checkpoint,
    match_subjects,
    read_protection,
    write_model,
)


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """--model-type and --allow-pickle: how ``load_model`` reads a single-file checkpoint."""
    p.add_argument(
        "--model-type",
        default="auto",
        metavar="TYPE",
        help="auto (detect from the tensors), sd1, sd2 (512, epsilon), sd2-v (768, v-prediction), "
        "or a diffusers config folder (default: auto)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="Accept a pickle .ckpt (read with torch.load(weights_only=True)); only for files you trust.",
    )


def cmd_export(args: argparse.Namespace) -> int:
    from .loading import load_model
    from .progress import tqdm_callback

    model = load_model(args.model, model_type=args.model_type, allow_pickle=args.allow_pickle)
    config, subjects = read_protection(args.model)  # a protected diffusers folder: keep its record
    kw = (
        {"template": args.template, "dtype": args.dtype, "progress": tqdm_callback("export")}
        if str(args.out).lower().endswith(".safetensors")
        else {}
    )
    out = write_model(model, args.out, config=config, overwrite=args.overwrite, subjects=subjects, **kw)
    print(f"written {out} ({'protected' if config is not None else 'format conversion'}, {model.kind})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if path.is_dir():
        raise InputError(f"{path} is a folder; `apdm inspect` reads single-file checkpoints (.safetensors).")
    info = inspect_checkpoint(path, args.model_type, args.allow_pickle)
    matches = None
    if args.subjects:
        record = info["apdm"].get("subjects")
        if not isinstance(record, dict) or not record.get("salt"):
            raise InputError(f"{path} records no protected subjects (no apdm.subjects metadata).")
        matches = match_subjects(record, args.subjects)
        info["subject_check"] = [{"image": n, "protected": ok} for n, ok in matches]
    print(json.dumps(info, indent=2) if args.json else format_inspection(info, matches))
    return 0


def register_cli(subparsers) -> None:
    e = subparsers.add_parser(
        "export",
        help="Write a model as a single .safetensors (original layout) or a diffusers folder.",
        description="Convert/export a model: single-file <-> diffusers folder, pickle .ckpt -> .safetensors, "
        "or a protected diffusers folder -> single file (with --template, the original checkpoint).",
    )
    e.add_argument("--model", required=True, help="A .safetensors/.ckpt checkpoint or a diffusers folder.")
    e.add_argument(
        "--out", required=True, help="Output: NAME.safetensors, or a folder name for diffusers format."
    )
    e.add_argument(
        "--template",
        help="Original single-file checkpoint whose layout/tensors to start from "
        "(default: --model itself when it is a single file).",
    )
    e.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="source",
        help="Float dtype of the written tensors (default: source = keep each tensor's dtype).",
    )
    e.add_argument("--overwrite", action="store_true", help="Replace an existing output.")
    add_source_arguments(e)
    e.set_defaults(func=cmd_export)

    i = subparsers.add_parser("inspect", help="Show a checkpoint's detected type and APDM metadata.")
    i.add_argument("file", help="A single-file checkpoint (.safetensors).")
    i.add_argument(
        "--subjects",
        nargs="+",
        metavar="IMAGE",
        help="Images or a folder: check whether they are among the file's protected subjects.",
    )
    i.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    add_source_arguments(i)
    i.set_defaults(func=cmd_inspect)
