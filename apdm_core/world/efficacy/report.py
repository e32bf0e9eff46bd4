"""The table as Markdown and the figures (robustness curve, frontier)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...plots import save_figure
from .cells import Cell
from .rows import ATTACKS, COMPARISON_ATTACKS, IMAGE_SETTINGS
from .summary import curve_points


def markdown_table(summary: list[dict]) -> str:
    head = (
        "| row | what | n | gated similarity (min-max) | raw similarity | class rate | efficiency (min) "
        "| class quality | unrelated quality | protect s | attack s |"
    )
    lines = [head, "|" + "---|" * 11]

    def f(v, fmt=".2f") -> str:
        return "" if v is None else format(v, fmt)

    for e in summary:
        eff = f"{e['efficiency']:.2f} ({e['efficiency_min']:.2f})" if "efficiency" in e else ""
        if "utility" in e:
            eff = f"utility {e['utility']:.2f} ({e['utility_min']:.2f})"
        lines.append(
            f"| {e['row']} | {e['note']} | {e['n']} | {e['score']:.3f} ({e['score_min']:.3f}-{e['score_max']:.3f}) "
            f"| {e['similarity']:.3f} | {f(e.get('class_rate'))} | {eff} | {f(e['class_quality'])} "
            f"| {f(e['unrelated_quality'])} | {e['protect_s']:.0f} | {e['attack_s']:.0f} |"
        )
    return "\n".join(lines)


def markdown_comparison(summary: list[dict]) -> str:
    """The protection comparison: per protection (rows) and what happened to the photos (columns), the
    gated similarity after the attack and, in brackets, the gap (raw similarity gained relative to the
    unprotected attack on the same photos: 1 = no protection, 0 = nothing learned); PSNR/SSIM of the
    protected photos for the image-level rows. Empty when no comparison column was measured."""
    by_name = {e["row"]: e for e in summary}
    models = [
        m
        for m in dict.fromkeys(n.split("+", 1)[0] for n in by_name if "+" in n)
        if any(f"{m}+{a}" in by_name for a in COMPARISON_ATTACKS[1:])
    ]
    if not models:
        return ""
    cols = [a for a in COMPARISON_ATTACKS if any(f"{m}+{a}" in by_name for m in models)]
    head = "| protection | " + " | ".join(ATTACKS[a][0] for a in cols) + " | PSNR / SSIM |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for m in models:
        cells = []
        for a in cols:
            e = by_name.get(f"{m}+{a}")
            if (
                e is None and a == "one_clean" and m not in IMAGE_SETTINGS
            ):  # clean photos: the standard attack
                e = by_name.get(f"{m}+attack")
            if e is None:
                cells.append("")
                continue
            gap = f" ({e['gap']:.2f})" if m != "base" and "gap" in e else ""
            cells.append(f"{e['score']:.2f}{gap}")
        quality = next(
            (by_name[f"{m}+{a}"] for a in cols if by_name.get(f"{m}+{a}", {}).get("psnr") is not None), None
        )
        q = f"{quality['psnr']:.1f} dB / {quality['ssim']:.3f}" if quality else ""
        label = {"base": "none (unprotected)", "apdm": "APDM demo preset (model)"}.get(m, m)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {q} |")
    return "\n".join(lines)


def plot_curves(cells: list[Cell], rows: list[str], path: str | Path, title: str = "") -> Path:
    """The robustness curve: gated similarity vs attack steps per row (mean, min-max band) as a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.6), dpi=100)
    ax = fig.add_subplot()
    for name in rows:
        points = curve_points(cells, name)
        if not points:
            continue
        xs = [max(s, 1) for s in points]
        ys = [np.mean([c.score for c in v]) for v in points.values()]
        lo = [np.min([c.score for c in v]) for v in points.values()]
        hi = [np.max([c.score for c in v]) for v in points.values()]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("attack steps (step 0 drawn at 1)")
    ax.set_ylabel("gated subject similarity")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(title or "robustness curve (mean over subjects x seeds; band = min-max)", fontsize="small")
    return save_figure(fig, path)


def plot_frontier(points: list[dict], path: str | Path, title: str = "") -> Path:
    """Efficiency against class-quality drop and against protection seconds, one labelled point per row."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.4), dpi=100)
    for i, (key, label) in enumerate(
        [
            ("class_drop", "class quality drop vs base (own class)"),
            ("protect_s", "protection CPU-seconds (one core)"),
        ]
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        for p in points:
            ax.scatter(p[key], p["efficiency"], s=18)
            ax.annotate(
                p["row"].split("+", 1)[0],
                (p[key], p["efficiency"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel(label)
        ax.set_ylabel("efficiency at the standard budget")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "protection vs quality vs cost (mean over subjects x seeds)", fontsize="small")
    return save_figure(fig, path)


def markdown_worst_case(entries: list[dict]) -> str:
    """The sweep per subject and seed: efficiency at the standard budget, at 2x and 4x, and the worst
    attacker of the sweep (and which it was); a mean row. Empty without entries."""
    if not entries:
        return ""

    def f(v) -> str:
        return "" if v is None else f"{v:.2f}"

    lines = ["| subject, seed | standard | 2x budget | 4x budget | worst over the sweep | worst attacker | attackers |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in entries:
        lines.append(f"| {e['subject']}, {e['seed']} | {f(e['standard'])} | {f(e['at_2x'])} | {f(e['at_4x'])} "
                     f"| {f(e['worst'])} | {e['worst_row']} | {len(e['efficiency'])} |")  # fmt: skip

    def mean(key: str) -> str:
        values = [e[key] for e in entries if e[key] is not None]
        return f"{np.mean(values):.2f} (min {np.min(values):.2f})" if values else ""

    lines.append(
        f"| mean (min) | {mean('standard')} | {mean('at_2x')} | {mean('at_4x')} | {mean('worst')} | | |"
    )
    return "\n".join(lines)
