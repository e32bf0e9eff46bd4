"""``apdm export`` and ``apdm inspect``: convert or export a checkpoint; show its type, its APDM metadata and
what its protection was measured to resist."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .card import format_measured, format_rounds
from .checkpoint import EMA_PREFIX, MODEL_TYPE_HELP, UNET_PREFIX, read_checkpoint, resolve_model_type
from .errors import InputError
from .export import DTYPES, match_subjects, read_apdm_metadata, read_measured, read_protection, write_model


def inspect_checkpoint(
    path: str | Path, model_type: str | None = None, allow_pickle: bool = False
) -> dict[str, Any]:
    """What a checkpoint file is: format, tensors, detected type (and why), APDM and other metadata."""
    ckpt = read_checkpoint(path, allow_pickle=allow_pickle)
    dtypes: dict[str, int] = {}
    for _, dt in ckpt.index.values():
        name = str(dt).replace("torch.", "")
        dtypes[name] = dtypes.get(name, 0) + 1
    info: dict[str, Any] = {
        "file": str(ckpt.path),
        "format": ckpt.format,
        "bytes": ckpt.path.stat().st_size,
        "tensors": len(ckpt.index),
        "dtypes": dtypes,
        "unet_tensors": sum(k.startswith(UNET_PREFIX) for k in ckpt.keys()),
        "ema_tensors": sum(k.startswith(EMA_PREFIX) for k in ckpt.keys()),
    }
    try:
        kind, cfg_dir, reasons = resolve_model_type(ckpt, model_type)
        info.update(model_type=kind, description=MODEL_TYPE_HELP.get(kind, kind), reasons=reasons)
    except InputError as exc:
        info.update(model_type=None, error=str(exc))
    info["apdm"] = read_apdm_metadata(ckpt.metadata)
    info["metadata"] = {k: v for k, v in ckpt.metadata.items() if not k.startswith("apdm.")}
    return info


def format_inspection(info: dict[str, Any], matches: Sequence[tuple[str, bool]] | None = None) -> str:
    """A human-readable report of ``inspect_checkpoint`` (and of ``match_subjects``)."""
    dts = ", ".join(f"{n} {d}" for d, n in sorted(info["dtypes"].items()))
    lines = [
        f"file:    {info['file']}",
        f"format:  {info['format']}, {info['bytes'] / 1e9:.2f} GB, {info['tensors']} tensors ({dts})",
    ]
    if info.get("model_type"):
        lines.append(f"type:    {info['model_type']}: {info['description']}")
        lines += [f"         - {r}" for r in info["reasons"]]
    else:
        lines.append(f"type:    unknown: {info.get('error')}")
    if info["ema_tensors"]:
        lines.append(f"ema:     {info['ema_tensors']} model_ema.* tensors (an EMA copy of the UNet)")
    apdm = info["apdm"]
    if not apdm:
        lines.append("apdm:    no APDM metadata (not written by apdm)")
    else:
        state = "protected" if apdm.get("protected") == "true" else "not protected (conversion only)"
        lines.append(
            f"apdm:    {state}; written by {apdm.get('tool')} {apdm.get('version')} on {apdm.get('created')}"
        )
        lines.append(f"         source sha256 {apdm.get('source_sha256')}")
        if isinstance(apdm.get("config"), dict):
            cfg = apdm["config"]
            keys = (
                "loss",
                "accumulation",
                "outer_steps",
                "inner_steps",
                "lr_protect",
                "beta",
                "class_prompt",
                "seed",
            )
            lines.append("         config: " + ", ".join(f"{k}={cfg[k]!r}" for k in keys if k in cfg))
        if isinstance(apdm.get("subjects"), dict):
            s = apdm["subjects"]
            lines.append(f"         subjects: {s.get('count')} image(s), stored as salted sha256 only")
            if s.get("earlier"):
                lines += ["", format_rounds(s)]
        if apdm.get("dropped"):
            lines.append(f"         dropped from the source: {apdm['dropped']}")
    for name, ok in matches or []:
        lines.append(
            f"subject: {name}: {'PROTECTED in this file' if ok else 'not among the protected subjects'}"
        )
    if info["metadata"]:
        lines.append("other metadata: " + ", ".join(sorted(info["metadata"])))
    measured = format_measured(apdm.get("measured") or [])
    if measured:
        lines += ["", measured]
    return "\n".join(lines)


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """--model-type and --allow-pickle: how ``load_model`` reads a single-file checkpoint."""
    p.add_argument(
        "--model-type",
        default="auto",
        metavar="TYPE",
        help="auto (detect from the tensors), sd1, sd2 (512, epsilon), sd2-v (768, v-prediction), sdxl, "
        "sdxl-v, or a diffusers config folder (default: auto)",
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
    model.info["measured"] = read_measured(args.model)  # and what it was measured to resist
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
