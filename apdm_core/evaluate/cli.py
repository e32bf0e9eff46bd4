"""``apdm attack``, ``apdm evaluate`` and ``apdm compare``: flags generated from AttackConfig/EvalConfig."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import APDMError, InputError
from ..fileio import shown


def register_cli(sub) -> None:
    from ..attack import AttackConfig
    from ..cli import add_config_arguments
    from ..export_cli import add_source_arguments
    from .config import EvalConfig

    a = sub.add_parser(
        "attack", help="Personalize a model on a subject as an attacker would (DreamBooth, LoRA, TI)."
    )
    a.add_argument("--config", help="Load attack settings from a JSON/YAML file (see --save-config).")
    a.add_argument("--save-config", metavar="FILE", help="Write the resolved attack settings to FILE.")
    a.add_argument(
        "--resume", action="store_true", help="Continue an interrupted attack from its state file."
    )
    a.add_argument(
        "--restart",
        action="store_true",
        help="Start over although a state file of an interrupted attack exists (it is replaced).",
    )
    a.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    add_config_arguments(a, AttackConfig)
    add_source_arguments(a)
    a.set_defaults(func=cmd_attack)

    e = sub.add_parser("evaluate", help="Sample a (attacked) model and compute the metrics.")
    e.add_argument("--model", required=True, help="The model (or the base model of --attack-output).")
    e.add_argument(
        "--attack-output", help="A folder written by `apdm attack --out` (LoRA/TI are applied to --model)."
    )
    e.add_argument("--images", nargs="+", required=True, help="Reference photos of the subject.")
    e.add_argument("--heldout", nargs="+", help="Subject photos the attack did not see (denoising score).")
    e.add_argument(
        "--identifier", default="sks", help="Identifier in the prompts (default: sks, or the attack's)."
    )
    e.add_argument("--class-noun", default="person", help="Class noun (default: person, or the attack's).")
    e.add_argument("--out", help="Write evaluation.json and samples/ to this new folder.")
    e.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    e.add_argument("--config", help="Load evaluation settings from a JSON/YAML file.")
    e.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    add_config_arguments(e, EvalConfig)
    add_source_arguments(e)
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser(
        "compare", help="Attack the unprotected and the protected model alike; write a report."
    )
    c.add_argument("--base", required=True, help="The unprotected model (diffusers folder or .safetensors).")
    c.add_argument("--protected", required=True, help="The protected model.")
    c.add_argument("--images", nargs="+", required=True, help="The attacker's photos of the subject.")
    c.add_argument("--heldout", nargs="+", help="Subject photos the attack did not see (denoising score).")
    c.add_argument(
        "--out", required=True, help="New folder for report.json, grid.png, losses.png, summary.md."
    )
    c.add_argument(
        "--attack-config", help="Attack settings file (JSON/YAML, see `apdm attack --save-config`)."
    )
    c.add_argument("--eval-config", help="Evaluation settings file (JSON/YAML).")
    c.add_argument(
        "--protection-history", help="JSON list of the protection's per-step losses, for the plot."
    )
    c.add_argument("--resume", action="store_true", help="Continue a stopped compare.")
    c.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    add_config_arguments(c, AttackConfig, exclude=("model", "images", "output", "state_path"))
    add_config_arguments(c, EvalConfig)
    add_source_arguments(c)
    c.set_defaults(func=cmd_compare)


def _load(path: str, device: str, args: argparse.Namespace):
    """The model at ``path``, a single file read as ``--model-type`` says (as `apdm protect` does)."""
    from ..loading import load_model
    from ..models import resolve_device

    return load_model(
        path, device=resolve_device(device), model_type=args.model_type, allow_pickle=args.allow_pickle
    )


def _print_metrics(metrics) -> None:
    for name, m in metrics.items():
        print(f"{name:>10}: {m.value:.4f}" if m.value is not None else f"{name:>10}: skipped ({m.skipped})")


def cmd_attack(args: argparse.Namespace) -> int:
    from ..attack import AttackConfig, run_attack
    from ..cli import config_from_args, save_config
    from ..progress import tqdm_callback

    cfg = config_from_args(args, AttackConfig)
    for name, what in (
        ("model", "a diffusers folder or .safetensors"),
        ("images", "a folder of subject photos"),
        ("output", "a new folder for the result"),
    ):
        if not getattr(cfg, name):
            raise APDMError(f"--{name} is required ({what}).")
    save_config(args, cfg.resolved(), model=cfg.model, photos=cfg.images, class_images=cfg.class_images)
    model = _load(cfg.model, cfg.device, args)
    result = run_attack(
        model,
        cfg.images,
        cfg,
        progress=tqdm_callback("attack"),
        resume=args.resume,
        restart=args.restart,
        overwrite=args.overwrite,
    )
    if result.cancelled:
        print(
            f"stopped after {result.steps_done} steps; state saved to {shown(result.state_path)} (continue with --resume)"
        )
        return 130
    last = result.history[-1]["loss"] if result.history else float("nan")
    print(
        f"{cfg.kind} attack written to {shown(result.output)}  ({result.steps_done} steps, {result.seconds:.1f} s, "
        f"last loss {last:.4g})"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..attack import load_attack_output
    from ..cli import config_from_args
    from ..fileio import atomic_path, check_target
    from ..progress import tqdm_callback
    from .config import EvalConfig
    from .core import evaluate

    cfg = config_from_args(args, EvalConfig)
    inputs = tuple(
        Path(p)
        for p in (args.model, args.attack_output, args.config, *(args.images or []), *(args.heldout or []))
        if p
    )
    if args.out:  # never over, in or around what it reads: refused before any sampling
        check_target(Path(args.out), args.overwrite, inputs)
    model, prompt_map, identifier, noun, instance = (
        _load(args.model, args.device, args),
        {},
        args.identifier,
        args.class_noun,
        None,
    )
    if args.attack_output:
        model, prompt_map, acfg = load_attack_output(model, args.attack_output)
        identifier, noun, instance = acfg.identifier, acfg.class_noun, acfg.instance_prompt
    result = evaluate(
        model,
        args.images,
        cfg,
        identifier=identifier,
        class_noun=noun,
        instance_prompt=instance,
        prompt_map=prompt_map,
        heldout=args.heldout,
        progress=tqdm_callback("evaluate"),
    )
    _print_metrics(result.metrics)
    if args.out:
        with atomic_path(Path(args.out), overwrite=args.overwrite, protected=inputs) as tmp:
            (tmp / "samples").mkdir(parents=True)
            for i, im in enumerate(result.samples):
                im.save(tmp / "samples" / f"{i:03d}.png")
            data = {
                "model": args.model,
                "attack_output": args.attack_output,
                "eval_config": cfg.to_dict(),
                "prompts": result.prompts,
                "seeds": result.seeds,
                "metrics": {k: m.to_dict() for k, m in result.metrics.items()},
            }
            (tmp / "evaluation.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
        print(f"evaluation written to {args.out}")
    return 0


def read_history(path: str) -> list[dict]:
    """A protection history: a JSON list of per-step dicts, or a mapping with a 'history' list."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"Cannot read the protection history {path}: {exc}") from exc
    history = data.get("history") if isinstance(data, dict) else data
    if not isinstance(history, list) or not all(isinstance(h, dict) and "step" in h for h in history):
        raise InputError(
            f"{path} is not a protection history (a JSON list of {{'step': ..., 'loss_protect': ...}})."
        )
    return history


def cmd_compare(args: argparse.Namespace) -> int:
    from ..attack import AttackConfig
    from ..card import format_measured, format_rounds
    from ..cli import config_from_args
    from ..driver import source_paths
    from ..export import read_measured, read_subject_record
    from ..fileio import check_paths
    from ..progress import tqdm_callback
    from .config import EvalConfig
    from .report import compare

    check_paths(
        [("output", Path(args.out))],
        source_paths(
            attack_config=args.attack_config or "",
            eval_config=args.eval_config or "",
            protection_history=args.protection_history or "",
        ),
    )
    attack_cfg = config_from_args(args, AttackConfig, file_flag="attack_config")
    eval_cfg = config_from_args(args, EvalConfig, file_flag="eval_config")
    history = read_history(args.protection_history) if args.protection_history else None
    earlier = "\n\n".join(t for t in (format_rounds(read_subject_record(args.protected)),
                                         format_measured(read_measured(args.protected))) if t)  # fmt: skip
    if earlier:  # what the file says it protects and was measured to resist, before this test
        print(earlier + "\n")
    base, protected = (
        _load(args.base, attack_cfg.device, args),
        _load(args.protected, attack_cfg.device, args),
    )
    result = compare(
        base,
        protected,
        args.images,
        attack_cfg,
        eval_cfg,
        out_dir=args.out,
        heldout=args.heldout,
        protection_history=history,
        progress=tqdm_callback("compare"),
        resume=args.resume,
        overwrite=args.overwrite,
    )
    if result.cancelled:
        print(f"stopped; progress kept in {result.work_dir} (continue with --resume)")
        return 130
    print((result.out_dir / "summary.md").read_text(encoding="utf-8"))
    print(f"report written to {result.out_dir}")
    return 0
