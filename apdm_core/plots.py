"""Loss curves as images, one drawing function for every home: the ComfyUI node's loss curve, the
app's live curve and the report's ``losses.png`` (matplotlib's Agg canvas, no pyplot: thread safe
and the host's matplotlib backend is left alone)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# history key -> legend label, in drawing order
LOSS_CURVES = {
    "loss_protect": "protection loss (DPO + prior)",
    "loss_per": "simulated attacker loss (DreamBooth)",
    "dpo": "DPO term",
}
CURVE_POINTS = 300  # a long series is averaged into at most this many points


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]
    smooth: bool = False  # draw faintly, with a moving average over ~1/20 of the points on top


@dataclass
class Panel:
    title: str
    xlabel: str
    series: list[Series] = field(default_factory=list)
    ylabel: str = "loss"


def binned(xs: list[float], ys: list[float], bins: int = CURVE_POINTS) -> tuple[list[float], list[float]]:
    """Average consecutive points into ``bins`` buckets (a 16,000-step run plots like a 300-step one)."""
    if len(xs) <= bins:
        return list(xs), list(ys)
    edges = np.linspace(0, len(xs), bins + 1).astype(int)
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    pairs = list(zip(edges, edges[1:]))
    return [x[a:b].mean() for a, b in pairs], [y[a:b].mean() for a, b in pairs]


def moving_average(values: list[float], window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return np.asarray(values, dtype=float)
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_losses(
    panels: list[Panel], size: tuple[int, int] = (640, 400), bins: int = 0, tight: bool = True
) -> Image.Image:
    """The panels side by side as an RGB image; ``bins`` > 0 averages longer series into that many
    points; ``tight=False`` uses fixed margins (a live curve: tight_layout costs more than the plot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        for s in panel.series:
            xs, ys = binned(s.xs, s.ys, bins) if bins else (s.xs, s.ys)
            if s.smooth:
                line = ax.plot(xs, ys, alpha=0.25, linewidth=1)[0]
                window = max(1, len(ys) // 20)  # each average drawn at the last x of its window
                ax.plot(xs[window - 1 :], moving_average(ys, window), color=line.get_color(), label=s.label)
            else:
                ax.plot(
                    xs, ys, label=s.label, linewidth=1, marker="o" if len(xs) < 20 else None, markersize=3
                )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if panel.series:
            ax.legend(loc="best", fontsize=8)
    if tight:
        fig.tight_layout()
    else:
        fig.subplots_adjust(left=0.1, right=0.98, top=0.9, bottom=0.16)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def protection_panel(history: list[dict], title: str = "protection (per outer step)", keys=None) -> Panel:
    """The per-outer-step losses of a protection run (``ProtectResult.history``)."""
    series = []
    for key, label in (keys or LOSS_CURVES).items():
        points = [(h["step"], h[key]) for h in history if h.get(key) is not None]
        if points:
            xs, ys = zip(*points)
            series.append(Series(label, list(xs), list(ys)))
    return Panel(title if history else f"{title}: no steps run", "outer step", series)


def loss_curve(
    history: list[dict], title: str = "APDM protection", size: tuple[int, int] = (640, 400)
) -> Image.Image:
    """Per-outer-step losses of a protection run (``ProtectResult.history``) as an RGB image."""
    return plot_losses([protection_panel(history, title)], size)


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure as a PNG, atomically (a benchmark's plot may replace its last one)."""
    from .fileio import atomic_path

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png")
    return path
