"""``compare``: attack the unprotected and the protected model the same way and report the difference.

Writes (atomically, into a new folder): ``report.json`` (every number and the full configs),
``grid.png`` (rows: reference images, unprotected + attack, protected + attack; labelled),
``losses.png`` (protection and attack loss curves), ``summary.md`` (a table of the metrics)
and ``samples/<arm>/*.png``. Work in progress lives in ``<out>.apdm-compare/``: a stopped
compare resumes mid-attack, and an arm that already finished is not redone.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..attack import AttackConfig, run_attack
from ..card import measured_record
from ..data import center_square
from ..driver import preflight
from ..errors import InputError
from ..fileio import atomic_path, check_paths, check_target, make_work_dir, remove_work_dir
from ..models import SDModel
from ..plots import save_figure
from ..progress import ProgressCallback, StopCheck
from .config import EvalConfig
from .core import evaluate, load_references
from .metrics import MetricResult
from .utility import utility_rows

log = logging.getLogger(__name__)

ARMS = ("unprotected", "protected")
UNATTACKED = "unattacked"  # the unprotected model before the attack: where the attack started from
ARM_LABELS = {"unprotected": "unprotected + attack", "protected": "protected + attack",
              UNATTACKED: "unprotected, no attack"}  # fmt: skip
REPORT_VERSION = 2  # 2: the unattacked arm, efficiency, utility rows


@dataclass
class ArmResult:
    metrics: dict[str, dict]  # name -> MetricResult.to_dict()
    history: list[dict]  # attack loss per step
    prompts: list[str]
    samples: list[Image.Image] = field(repr=False, default_factory=list)
    steps_done: int = 0
    attack_seconds: float = 0.0
    eval_seconds: float = 0.0


@dataclass
class CompareResult:
    report: dict  # the content of report.json
    arms: dict[str, ArmResult]
    out_dir: Path | None = None
    cancelled: bool = False
    work_dir: Path | None = None  # where a stopped compare keeps its progress
    utility: list = field(default_factory=list)  # UtilityRow per utility prompt (no attack)

    def value(self, metric: str, arm: str) -> float | None:
        return self.arms[arm].metrics.get(metric, {}).get("value")


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------
def compare_identity(base: SDModel, protected: SDModel, refs, attack: AttackConfig, ev: EvalConfig) -> str:
    h = hashlib.sha256(
        json.dumps([attack.identity_dict(), attack.resolved().steps, ev.to_dict()], sort_keys=True).encode()
    )
    for m in (base, protected):
        h.update(m.fingerprint().encode())
    for im in refs:
        h.update(im.tobytes())
    return h.hexdigest()


def _run_arm(
    name: str,
    model: SDModel,
    images,
    refs,
    attack_config: AttackConfig,
    eval_config: EvalConfig,
    heldout,
    work: Path,
    progress,
    should_stop,
    resume: bool,
) -> ArmResult | None:
    """Attack ``model``, sample and score it; None when stopped (the attack state is kept in ``work``)."""
    attack = run_attack(
        model,
        images,
        attack_config,
        progress,
        should_stop,
        resume=resume,
        state_path=work / f"{name}-attack-state.pt",
    )
    if attack.cancelled:
        return None
    cfg = attack.config
    ev = evaluate(
        attack.model,
        refs,
        eval_config,
        identifier=cfg.identifier,
        class_noun=cfg.class_noun,
        instance_prompt=cfg.instance_prompt,
        prompt_map=attack.prompt_map,
        heldout=heldout,
        progress=progress,
        should_stop=should_stop,
    )
    arm = ArmResult(
        {k: m.to_dict() for k, m in ev.metrics.items()},
        attack.history,
        ev.prompts,
        ev.samples,
        attack.steps_done,
        attack.seconds,
        ev.seconds,
    )
    del attack, ev
    _free_memory()
    return arm


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _save_arm(work: Path, name: str, arm: ArmResult, identity: str) -> None:
    folder = work / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, im in enumerate(arm.samples):
        im.save(folder / f"sample_{i:03d}.png")
    data = {k: v for k, v in arm.__dict__.items() if k != "samples"}
    (folder / "arm.json").write_text(json.dumps({"identity": identity, **data}, indent=1), encoding="utf-8")


def _load_arm(work: Path, name: str, identity: str) -> ArmResult | None:
    path = work / name / "arm.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.pop("identity", None) != identity:
        raise InputError(
            f"{work} holds a compare with other models, images or settings; delete it or run without --resume."
        )
    samples = []
    for i in range(len(data["prompts"])):
        with Image.open(work / name / f"sample_{i:03d}.png") as im:
            samples.append(im.convert("RGB"))
    return ArmResult(samples=samples, **data)


def compare(
    base: SDModel,
    protected: SDModel,
    images,
    attack_config: AttackConfig,
    eval_config: EvalConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    heldout=None,
    protection_history: list[dict] | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    resume: bool = False,
    overwrite: bool = False,
    grid_columns: int = 6,
) -> CompareResult:
    """Run the same attack on ``base`` and ``protected``, evaluate both, write the report to ``out_dir``.

    ``images``: the attacker's subject images (folder, files or PIL images), also the DINO/face
    references; ``heldout``: subject images the attack did not see (denoising score; default the
    same images). ``protection_history``: ``ProtectResult.history`` for the loss plot. A stop
    returns ``cancelled=True``; call again with ``resume=True`` to continue.
    """
    eval_config = eval_config or EvalConfig()
    attack_config.validate()
    eval_config.validate()
    out = Path(out_dir) if out_dir else None
    if out is not None:
        check_report_paths(out, overwrite, (base, protected), images, heldout)
    refs = load_references(images, base.native_resolution)
    identity = compare_identity(base, protected, refs, attack_config, eval_config)
    cache = Path(attack_config.cache_dir or _cache()) / "compare" / identity[:20]
    work = Path(str(out) + ".apdm-compare") if out else cache
    if work.exists() and not resume:
        remove_work_dir(work)  # only ever a folder this tool made
    make_work_dir(work)
    t0 = time.perf_counter()
    arms = _run_arms(base, protected, images, refs, attack_config, eval_config, heldout, work, progress,
                     should_stop, resume, identity)  # fmt: skip
    if arms is None:
        return CompareResult({}, {}, None, cancelled=True, work_dir=work)
    utility = utility_rows(
        base, protected, attack_config.resolved().class_noun, eval_config, progress, should_stop
    )
    report = build_report(base, protected, refs, attack_config, eval_config, arms, protection_history, heldout,
                          time.perf_counter() - t0, utility)  # fmt: skip
    protected.info.setdefault("measured", []).append(measured_record(report))  # an export carries it
    result = CompareResult(report, arms, utility=utility)
    if out is not None:
        result.out_dir = write_report(
            out, report, refs, arms, protection_history, grid_columns, overwrite, utility
        )
    remove_work_dir(work)
    return result


def _run_arms(base, protected, images, refs, attack_config, eval_config, heldout, work, progress, should_stop,
              resume, identity) -> dict[str, ArmResult] | None:  # fmt: skip
    """The attack on each model, evaluated, and the unprotected model evaluated without an attack (where
    the attack started from); each kept in ``work`` as it finishes. None when stopped."""
    arms: dict[str, ArmResult] = {}
    for name, model in zip(ARMS, (base, protected)):
        arm = _load_arm(work, name, identity) if resume else None
        if arm is None:
            arm = _run_arm(name, model, images, refs, attack_config, eval_config, heldout, work, progress,
                           should_stop, resume)  # fmt: skip
            if arm is None:
                return None
            _save_arm(work, name, arm, identity)
        arms[name] = arm
    arm = _load_arm(work, UNATTACKED, identity) if resume else None
    if arm is None:
        cfg = attack_config.resolved()
        ev = evaluate(base, refs, eval_config, identifier=cfg.identifier, class_noun=cfg.class_noun,
                      instance_prompt=cfg.instance_prompt, heldout=heldout, progress=progress,
                      should_stop=should_stop)  # fmt: skip
        arm = ArmResult(
            {k: m.to_dict() for k, m in ev.metrics.items()}, [], ev.prompts, ev.samples, 0, 0.0, ev.seconds
        )
        _save_arm(work, UNATTACKED, arm, identity)
    arms[UNATTACKED] = arm
    return arms


def check_report_paths(out: Path, overwrite: bool, models, images, heldout) -> None:
    """The report and its progress folder beside it: never over, in or around a model or photo folder
    the comparison reads (the one path rule), and room for both, before any attack."""
    files = (
        [images]
        if isinstance(images, (str, Path))
        else [i for i in (images or []) if isinstance(i, (str, Path))]
    )
    if isinstance(heldout, (str, Path)):
        files.append(heldout)
    sources = tuple(Path(m.source) for m in models if m.source) + tuple(map(Path, files))
    check_target(out, overwrite, sources)
    work = Path(str(out) + ".apdm-compare")
    check_paths([("progress folder", work)], [("input", p) for p in sources])
    preflight([("report", out, 4 << 20), ("progress folder", work / "arm", 4 << 20)])


def _cache() -> Path:
    from ..pairs import default_cache_dir

    return default_cache_dir()


# ------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------
def _describe_source(model: SDModel) -> dict:
    return {
        "source": model.source,
        "kind": model.kind,
        "fingerprint": model.fingerprint(),
        "prediction_type": model.prediction_type,
    }


def metric_rows(arms: dict[str, ArmResult]) -> list[dict]:
    """One row per metric: both values after the attack, the change, whether it points to 'attack
    failed', and (with the unattacked model measured) the efficiency: the share of the attack's change
    on the unprotected model that the protection took away, (unprotected - protected) / (unprotected -
    unattacked); 1 = the protected model after the attack is where the attack started, 0 = no protection."""
    rows = []
    before = arms.get(UNATTACKED)
    for name in arms["unprotected"].metrics:
        u, p = arms["unprotected"].metrics[name], arms["protected"].metrics.get(name, {})
        uv, pv = u.get("value"), p.get("value")
        bv = before.metrics.get(name, {}).get("value") if before is not None else None
        row = {
            "metric": name,
            "unprotected": uv,
            "protected": pv,
            "unattacked": bv,
            "protected_if": u["protected_if"],
            "description": u.get("description", ""),
            "skipped": u.get("skipped") or p.get("skipped") or "",
        }
        if uv is not None and pv is not None:
            row["change"] = pv - uv
            row["protection_effect"] = (pv < uv) if u["protected_if"] == "lower" else (pv > uv)
            if bv is not None and abs(uv - bv) > 1e-9:
                row["efficiency"] = (uv - pv) / (uv - bv)
        rows.append(row)
    return rows


def build_report(
    base, protected, refs, attack_config, eval_config, arms, protection_history, heldout, seconds: float,
    utility=(),
) -> dict:  # fmt: skip
    return {
        "version": REPORT_VERSION,
        "apdm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": seconds,
        "attack_config": attack_config.resolved().to_dict(),
        "eval_config": eval_config.to_dict(),
        "models": {"unprotected": _describe_source(base), "protected": _describe_source(protected)},
        "references": len(refs),
        "heldout": "given" if heldout else "the attack images (in-sample)",
        "metrics": metric_rows(arms),
        "utility": [row.to_dict() for row in utility],
        "arms": {
            name: {k: v for k, v in arm.__dict__.items() if k != "samples"} for name, arm in arms.items()
        },
        "protection_history": protection_history or [],
        "files": {
            "grid": "grid.png",
            "losses": "losses.png",
            "summary": "summary.md",
            "samples": {name: f"samples/{name}" for name in arms},
        },
    }


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4g}"


def summary_markdown(report: dict) -> str:
    cfg = report["attack_config"]
    lines = [
        f"# Protection test: {cfg['kind']} attack",
        "",
        f"Attack: {cfg['kind']}, {cfg['steps']} steps, lr {cfg['lr']:g}, batch {cfg['batch_size']}, "
        f'prior weight {cfg["prior_weight"]:g}, prompt "{cfg["instance_prompt"]}", seed {cfg["seed"]}.  ',
        f"Samples: {report['eval_config']['num_samples']} per model, {report['eval_config']['eval_steps']} steps, "
        f"guidance {report['eval_config']['eval_guidance']:g}. Held-out images: {report['heldout']}.",
        "",
        "| metric | unprotected, no attack | unprotected + attack | protected + attack | change | protected if "
        "| protection effect | efficiency |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["metrics"]:
        if r["unprotected"] is None or r["protected"] is None:
            continue
        effect = "yes" if r["protection_effect"] else "no"
        lines.append(
            f"| {r['metric']} | {_fmt(r.get('unattacked'))} | {_fmt(r['unprotected'])} | {_fmt(r['protected'])} | "
            f"{r['change']:+.4g} | {r['protected_if']} | {effect} | {_fmt(r.get('efficiency'))} |"
        )
    lines += ["", "Efficiency: the share of the attack's change on the unprotected model that the protection took "
              "away (1 = the protected model after the attack is where the unprotected one started)."]  # fmt: skip
    if report.get("utility"):
        lines += ["", "## What the protection cost (no attack)", "",
                  "The same prompts and seeds on both models before any attack. Similarity: SSIM of the protected "
                  "model's image to the unprotected one's (1 = unchanged). Quality: share of the images showing what "
                  "the prompt names, where a judge knows it.", "",
                  "| prompt | similarity | quality unprotected | quality protected |", "| --- | --- | --- | --- |"]  # fmt: skip
        for u in report["utility"]:
            q = u.get("quality") or {}
            lines.append(f"| {u['prompt']} | {u['similarity']:.3f} | {_fmt(q.get('unprotected'))} "
                         f"| {_fmt(q.get('protected'))} |")  # fmt: skip
    skipped = [r for r in report["metrics"] if r["skipped"]]
    if skipped:
        lines += ["", "Skipped metrics:", ""] + [f"- `{r['metric']}`: {r['skipped']}" for r in skipped]
    lines += [
        "",
        "Files: `grid.png` (samples), `losses.png` (loss curves), `report.json` (every number).",
        "",
    ]
    return "\n".join(lines)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global state
    return fig


def save_grid(
    path: Path, refs, arms: dict[str, ArmResult], title: str, columns: int = 6, thumb: int = 256, utility=()
) -> Path:
    """A labelled PNG grid: reference row, the unattacked model, one row of samples per attacked model,
    then what the protection cost: each utility prompt on the unprotected and the protected model."""
    rows = [("reference", refs)] + [
        (ARM_LABELS[n], arms[n].samples) for n in (UNATTACKED, *ARMS) if n in arms
    ]
    for u in utility:
        rows += [(f"{name}:\n{u.prompt}", u.samples[name]) for name in ("unprotected", "protected")]
    ncols = max(1, min(columns, max(len(images) for _, images in rows)))
    fig = _figure(1.0 + 2.0 * ncols, 0.6 + 2.1 * len(rows))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(np.asarray(center_square(images[c].convert("RGB"), thumb)))
            if c == 0:
                ax.set_ylabel(label, fontsize=11)
    fig.suptitle(title, fontsize=12)
    return save_figure(fig, path)


def save_loss_plot(path: Path, arms: dict[str, ArmResult], protection_history: list[dict] | None) -> Path:
    """Protection losses per outer step (when given) and the attack loss per step for both arms."""
    from ..plots import Panel, Series, plot_losses, protection_panel

    panels = []
    if protection_history:
        keys = {k: k for k in ("loss_protect", "loss_per", "dpo", "prior")}
        panels.append(protection_panel(protection_history, keys=keys))
    attack = Panel("attack loss (per step, moving average)", "attack step")
    for name in ARMS:
        if name in arms and arms[name].history:
            losses = [h["loss"] for h in arms[name].history]
            attack.series.append(
                Series(ARM_LABELS[name], list(range(1, len(losses) + 1)), losses, smooth=True)
            )
    panels.append(attack)
    plot_losses(panels, (600 * len(panels), 400)).save(path, format="png")
    return path


def write_report(
    out: Path, report: dict, refs, arms, protection_history, columns: int, overwrite: bool, utility=()
) -> Path:
    rows = {r["metric"]: r for r in report["metrics"]}
    title = f"{report['attack_config']['kind']} attack"
    if rows.get("dino", {}).get("unprotected") is not None:
        d = rows["dino"]
        title += f"  |  DINO {d['unprotected']:.3f} -> {d['protected']:.3f}"
    elif rows.get("denoise", {}).get("unprotected") is not None:
        d = rows["denoise"]
        title += f"  |  denoising error {d['unprotected']:.4f} -> {d['protected']:.4f}"
    with atomic_path(out, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        for name, arm in arms.items():
            (tmp / "samples" / name).mkdir(parents=True)
            for i, im in enumerate(arm.samples):
                im.save(tmp / "samples" / name / f"{i:03d}.png")
            (tmp / "samples" / name / "prompts.json").write_text(json.dumps(arm.prompts, indent=1))
        save_grid(tmp / "grid.png", refs, arms, title, columns, utility=utility)
        save_loss_plot(tmp / "losses.png", arms, protection_history)
        (tmp / "summary.md").write_text(summary_markdown(report), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    return out


__all__ = ["ARMS", "ArmResult", "CompareResult", "MetricResult", "compare", "metric_rows", "summary_markdown"]
