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


CURVE_POINTS = 300  # a long run's curve is averaged into at most this many points per series


def _binned(xs: list[float], ys: list[float], bins: int) -> tuple:
    """Average consecutive points into ``bins`` buckets (a 16,000-step run plots like a 300-step one)."""
    import numpy as np

    if len(xs) <= bins:
        return xs, ys
    edges = np.linspace(0, len(xs), bins + 1).astype(int)
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    return [x[a:b].mean() for a, b in zip(edges, edges[1:])], [
        y[a:b].mean() for a, b in zip(edges, edges[1:])
    ]


def curve_image(
    curves: dict[str, list[tuple[int, dict[str, float]]]], names: dict[str, str] | None = None,
    width: int = 640, height: int = 300,
):  # fmt: skip
    """The loss curves of a job as a PIL image (matplotlib's Agg canvas, no pyplot: thread safe).
    ``names``: display names of series ('attack #2' -> 'protected + attack')."""
    names = names or {}
    series = [(f"{names.get(stage, stage)}: {k}", pts) for stage, pts in curves.items()
              for k in (pts[-1][1] if pts else {})]  # fmt: skip
    if len(curves) == 1:  # one stage: the loss names alone say it
        series = [(label.split(": ", 1)[1], pts) for label, pts in series]
    if not series:
        return None
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    from PIL import Image

    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    fig.subplots_adjust(
        left=0.1, right=0.98, top=0.9, bottom=0.16
    )  # fixed: tight_layout costs more than the plot
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, pts in series:
        key = label.rsplit(": ", 1)[-1]
        xs, ys = _binned([s for s, v in pts if key in v], [v[key] for _, v in pts if key in v], CURVE_POINTS)
        ax.plot(xs, ys, label=label, linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("losses per step" + (f" (averaged into {CURVE_POINTS} points)" if max(len(p) for _, p in series)
                                      > CURVE_POINTS else ""), fontsize=9)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


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
