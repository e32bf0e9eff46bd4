"""Figures as PIL images (hosts show them; reports save them): the protection loss curves."""

from __future__ import annotations

import io

from PIL import Image

# history key -> legend label, in drawing order
LOSS_CURVES = {
    "loss_protect": "protection loss (DPO + prior)",
    "loss_per": "simulated attacker loss (DreamBooth)",
    "dpo": "DPO term",
}


def loss_curve(
    history: list[dict], title: str = "APDM protection", size: tuple[int, int] = (640, 400)
) -> Image.Image:
    """Per-outer-step losses of a protection run (``ProtectResult.history``) as an RGB image."""
    from matplotlib.figure import Figure  # no pyplot: leaves the host's matplotlib backend alone

    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = fig.add_subplot()
    drawn = 0
    for key, label in LOSS_CURVES.items():
        points = [(h["step"], h[key]) for h in history if h.get(key) is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label, marker="o" if len(points) < 20 else None, markersize=3)
            drawn += 1
    ax.set_xlabel("outer step")
    ax.set_ylabel("loss")
    ax.set_title(title if history else f"{title}: no steps run")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")
