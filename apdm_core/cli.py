"""``apdm`` command line: protect, demo, config. Flags are generated from ProtectConfig."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from . import __version__
from .config import PRESETS, ProtectConfig
from .errors import APDMError
from .fileio import shown

log = logging.getLogger("apdm")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _number(text: str) -> float:
    """A float flag's value: a number (5e-6) or a fraction (8/255)."""
    num, slash, den = text.partition("/")
    try:
        return float(num) / float(den) if slash else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 5e-6 or 8/255)") from None


def add_config_arguments(parser: argparse.ArgumentParser, cls=ProtectConfig, exclude=()) -> None:
    """One flag per field of a config dataclass (``--outer-steps`` ...), with the field's help text."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in (f for f in fields(cls) if f.name not in exclude):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(f"{meta['group']} options"))
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = f"{meta['help']} (default: {default!r})".replace(
            "%", "%%"
        )  # argparse formats help with %
        kw = {"help": help_text, "default": argparse.SUPPRESS, "dest": f.name}
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        typ = hints[f.name]
        if typing.get_origin(typ) is list:
            kw["nargs"], kw["type"] = "+", typing.get_args(typ)[0]
        elif typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typ in (int, float, int | None, float | None):
            kw["type"] = typ if typ in (int, float) else typing.get_args(typ)[0]
            if kw["type"] is float:
                kw["type"] = _number
        names = [_flag(f.name)]
        if f.name == "output":
            names.append("--out")
        if f.name == "extra_identifiers":
            names.append("--identifiers")
        group.add_argument(*names, **kw)


def config_from_args(args: argparse.Namespace, cls=ProtectConfig, file_flag: str = "config"):
    """defaults < --preset < --config FILE (or another ``file_flag``) < explicit flags."""
    values: dict = {}
    if getattr(args, "preset", None):
        values.update(cls.from_preset(args.preset).to_dict())
    if getattr(args, file_flag, None):
        values.update(cls.load(getattr(args, file_flag)).to_dict())
    values.update({f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
    return cls(**values)


def _quiet_libraries() -> None:
    for name in ("diffusers", "transformers"):
        try:
            mod = __import__(name)
            mod.utils.logging.set_verbosity_error()
            mod.utils.logging.disable_progress_bar()
        except Exception:  # pragma: no cover - optional niceties
            pass


def cmd_protect(args: argparse.Namespace) -> int:
    from .progress import tqdm_callback
    from .protection import protect

    config = config_from_args(args)
    if args.subject:  # --subject PHOTOS INSTANCE_PROMPT CLASS_PROMPT, repeated: more subjects in one run
        more = [{"images": [d], "instance_prompt": i, "class_prompt": c} for d, i, c in args.subject]
        config = config.replace(subjects=[*config.subjects, *more])
    if not config.model:
        raise APDMError("--model is required (a diffusers folder or a .safetensors checkpoint).")
    if not config.images:
        raise APDMError("--images is required (a folder of 4-6 photos of the subject).")
    if not config.output:
        raise APDMError("--out is required (a new folder or .safetensors file for the protected model).")
    save_config(
        args,
        config,
        model=config.model,
        photos=config.images,
        class_images=config.class_images,
        backdoor_images=config.backdoor_images,
    )
    model = None
    if args.allow_pickle:  # a pickle checkpoint the user vouches for: read it here (weights_only=True)
        from .loading import load_model
        from .models import resolve_device

        model = load_model(
            config.model,
            device=resolve_device(config.device),
            model_type=config.model_type,
            allow_pickle=True,
        )
    result = protect(
        config,
        model=model,
        progress=tqdm_callback(),
        resume=args.resume,
        keep_state=args.keep_state,
        overwrite=args.overwrite,
        restart=args.restart,
    )
    return _report_protect(result)


def save_config(args: argparse.Namespace, config, **inputs) -> None:
    """``--save-config FILE``: the resolved settings, written atomically; never over or into an input
    (the path rule of ``fileio.check_paths``, with the ``--config`` file among the inputs)."""
    path = getattr(args, "save_config", None)
    if not path:
        return
    from .driver import source_paths
    from .fileio import check_paths

    check_paths(
        [("config file (--save-config)", Path(path))],
        source_paths(config=getattr(args, "config", None) or "", **inputs),
    )
    config.save(path)
    print(f"config written to {shown(path)}")


def _report_protect(result) -> int:
    if result.cancelled:
        print(
            f"stopped after {result.steps_done} outer steps; state saved to {shown(result.state_path)} (continue with --resume)"
        )
        return 130
    last = result.history[-1] if result.history else {}
    print(
        f"protected model written to {shown(result.output)}  ({result.steps_done} outer steps, {result.seconds:.1f} s)"
    )
    if last:
        print("last step: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float)))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    config = ProtectConfig.from_preset(args.preset)
    sys.stdout.write(config.to_yaml() if args.format == "yaml" else config.to_json() + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .progress import tqdm_callback

    result = run_demo(
        Path(args.out), progress=tqdm_callback("demo"), overwrite=args.overwrite, attack=not args.no_attack
    )
    code = _report_protect(result.protection)
    if code or result.comparison is None:
        return code
    if result.comparison.cancelled:
        print(
            f"stopped during the attack test; run the same command again to finish it ({result.comparison.work_dir})"
        )
        return 130
    report = result.report_dir
    print((report / "summary.md").read_text(encoding="utf-8"))
    print(f"report written to {report} (grid.png, losses.png, report.json, summary.md)")
    return 0


# Modules that add their own subcommands: each defines ``register_cli(subparsers)`` and sets
# ``func`` on its parsers. Add a module here rather than growing this file.
COMMAND_MODULES: list[str] = [
    "apdm_core.evaluate.cli",
    "apdm_core.export_cli",
    "apdm_core.images.cli",
    "apdm_core.ui",
    "apdm_core.world.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apdm", description="Protect diffusion models against unauthorized personalization (APDM)."
    )
    parser.add_argument("--version", action="version", version=f"apdm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show library logs and progress bars.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("protect", help="Protect a model against personalization of one subject.")
    p.add_argument(
        "--config", help="Load settings from a JSON/YAML file written by --save-config or `apdm config`."
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="Start from a preset (paper = defaults).")
    p.add_argument(
        "--save-config",
        metavar="FILE",
        help="Write the resolved settings to FILE (.json/.yaml) to repeat the run.",
    )
    p.add_argument(
        "--resume", action="store_true", help="Continue from the state file of an interrupted run."
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="Start over although a state file of an interrupted run exists (it is replaced).",
    )
    p.add_argument(
        "--keep-state",
        action="store_true",
        help="Keep the state file after finishing (to extend the run later).",
    )
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output.")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="Accept a pickle .ckpt model (read with torch.load(weights_only=True)); only for files you trust.",
    )
    p.add_argument("--subject", nargs=3, action="append", metavar=("PHOTOS", "INSTANCE_PROMPT", "CLASS_PROMPT"),
                   help="Another subject to protect in the same run (repeat it for more): its photo folder, "
                        "its instance prompt (with its own identifier) and its class prompt.")  # fmt: skip
    add_config_arguments(p, exclude=("subjects",))
    p.set_defaults(func=cmd_protect)

    c = sub.add_parser("config", help="Print a full config (to edit and pass with --config).")
    c.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    c.add_argument("--format", choices=("yaml", "json"), default="yaml")
    c.set_defaults(func=cmd_config)

    d = sub.add_parser("demo", help="Run the whole flow on the built-in demo model (CPU, a few minutes).")
    d.add_argument("--out", default="apdm_out/demo", help="Output folder (default: apdm_out/demo).")
    d.add_argument("--overwrite", action="store_true", help="Replace an existing demo output.")
    d.add_argument(
        "--no-attack", action="store_true", help="Stop after the protection (no attack test, no report)."
    )
    d.set_defaults(func=cmd_demo)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        _quiet_libraries()
    for stream in (sys.stdout, sys.stderr):  # a file name in any encoding can always be printed
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return args.func(args)
    except APDMError as exc:
        print(f"apdm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        state = getattr(exc, "state_path", None)
        if state is not None:
            print(
                f"apdm: interrupted; the run's state is saved in {state}. Continue it with:\n  "
                f"{resume_command(argv)}",
                file=sys.stderr,
            )
        else:
            print("apdm: interrupted", file=sys.stderr)
        return 130


def resume_command(argv: list[str] | None) -> str:
    """The command line that was run, with --resume instead of --restart (printed after Ctrl-C)."""
    import shlex

    words = [w for w in (sys.argv[1:] if argv is None else argv) if w != "--restart"]
    if "--resume" not in words:
        words.append("--resume")
    return "apdm " + " ".join(shlex.quote(w) for w in words)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
