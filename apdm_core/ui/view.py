"""What the page shows: the status line, the loss-curve image of a job, a report folder."""

from __future__ import annotations

import html
from pathlib import Path

from ..progress import ProgressEvent, format_seconds


def _status_html(message: str, event: ProgressEvent | None = None, kind: str = "info") -> str:
    colour = {"info": "inherit", "error": "#c0392b", "ok": "#1e8449"}[kind]
    parts = [f'<div class="apdm-status" style="color:{colour}">{html.escape(message)}</div>']
    if event is not None:
        parts.insert(
            0,
            f'<progress value="{event.step}" max="{max(event.total, 1)}" style="width:100%"></progress>'
            f'<div class="apdm-progress">{html.escape(event.describe())} · elapsed '
            f"{format_seconds(event.elapsed_s)}</div>",
        )
    return "".join(parts)


class LossCurves:
    """The losses of a run by series, as ``curve_image`` draws them: series name -> [(step, losses)].
    A stage whose step counter restarts (the attack of the unprotected, then of the protected model)
    starts a new series ('attack', then 'attack #2') instead of drawing back over the first."""

    def __init__(self) -> None:
        self.series: dict[str, list[tuple[int, dict[str, float]]]] = {}
        self._current: dict[str, str] = {}  # stage -> its current series

    def add(self, event: ProgressEvent) -> None:
        if not event.losses:
            return
        name = self._current.get(event.stage)
        if name is None or self.series[name][-1][0] >= event.step:  # new, or its counter restarted
            n = sum(1 for k in self.series if k == event.stage or k.startswith(event.stage + " #"))
            name = self._current[event.stage] = event.stage if n == 0 else f"{event.stage} #{n + 1}"
            self.series[name] = []
        self.series[name].append((event.step, dict(event.losses)))


def curve_image(
    curves: dict[str, list[tuple[int, dict[str, float]]]],
    names: dict[str, str] | None = None,
    width: int = 640,
    height: int = 300,
):
    """The loss curves of a job as a PIL image (``plots.plot_losses``: no pyplot, thread safe).
    ``names``: display names of series ('attack #2' -> 'protected + attack')."""
    from ..plots import CURVE_POINTS, Panel, Series, plot_losses

    names = names or {}
    series = [
        (f"{names.get(stage, stage)}: {k}", k, pts)
        for stage, pts in curves.items()
        for k in (pts[-1][1] if pts else {})
    ]
    if not series:
        return None
    one_stage = len(curves) == 1  # one stage: the loss names alone say it
    drawn = [
        Series(
            key if one_stage else label, [s for s, v in pts if key in v], [v[key] for _, v in pts if key in v]
        )
        for label, key, pts in series
    ]
    longest = max(len(s.xs) for s in drawn)
    title = "losses per step" + (f" (averaged into {CURVE_POINTS} points)" if longest > CURVE_POINTS else "")
    return plot_losses([Panel(title, "step", drawn)], (width, height), bins=CURVE_POINTS, tight=False)


def report_view(folder: Path) -> dict:
    """What the page shows of a compare report folder: the grid, the loss plot, the Markdown table."""
    from PIL import Image

    def image(name):
        with Image.open(folder / name) as im:
            return im.convert("RGB")

    summary = (folder / "summary.md").read_text(encoding="utf-8")
    return {"grid": image("grid.png"), "losses": image("losses.png"), "summary": summary, "folder": folder}


# ------------------------------------------------------------------------------------------
# the event functions
# ------------------------------------------------------------------------------------------


def images_view(result) -> dict:
    """What the page shows of an image protection: the protected photos and a PSNR/SSIM table."""
    from diffusers.utils import make_image_grid

    rows = "\n".join(
        f"| {n} | {m['psnr']:.1f} | {m['ssim']:.3f} | {m['max_change']} |"
        for n, m in zip(result.names, result.metrics)
    )
    summary = (
        f"**{result.config.method.upper()}**, budget {result.config.budget_levels}/255, "
        f"{result.steps_done} iterations, written to `{result.output}`\n\n"
        "| photo | PSNR (dB) | SSIM | largest change (/255) |\n|---|---|---|---|\n" + rows
    )
    cols = min(len(result.images), 6)
    rows_n = -(-len(result.images) // cols)
    images = result.images + [result.images[-1].copy()] * (rows_n * cols - len(result.images))
    return {
        "grid": make_image_grid(images, rows=rows_n, cols=cols),
        "losses": None,
        "summary": summary,
        "folder": result.output,
    }
