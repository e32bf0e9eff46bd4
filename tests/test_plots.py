"""plots.py: the one loss-curve drawer behind the ComfyUI node, the app's live curve and the report."""

from __future__ import annotations

import numpy as np
import pytest

from apdm_core import plots


def test_loss_curve_of_a_history_and_of_no_steps():
    history = [{"step": i, "loss_protect": 1.0 / (i + 1), "loss_per": 0.5, "dpo": None} for i in range(30)]
    image = plots.loss_curve(history, size=(400, 250))
    assert image.mode == "RGB" and image.size == (400, 250)
    assert np.asarray(image).std() > 5  # something is drawn
    assert plots.loss_curve([], size=(300, 200)).size == (300, 200)
    panel = plots.protection_panel(history)
    assert [s.label for s in panel.series] == [
        plots.LOSS_CURVES["loss_protect"],
        plots.LOSS_CURVES["loss_per"],
    ]


def test_binned_averages_into_at_most_bins_points():
    xs, ys = list(range(1000)), [float(i % 2) for i in range(1000)]
    bx, by = plots.binned(xs, ys, 100)
    assert len(bx) == len(by) == 100 and by == pytest.approx([0.5] * 100) and bx[0] == pytest.approx(4.5)
    assert plots.binned([1, 2], [3, 4], 100) == ([1, 2], [3, 4])
    assert plots.moving_average([1, 2, 3, 4], 2).tolist() == [1.5, 2.5, 3.5]


def test_panels_side_by_side_with_smoothing_and_fixed_margins():
    attack = plots.Panel("attack", "step", [plots.Series("a", list(range(1, 101)), list(np.linspace(1, 0, 100)),
                                                         smooth=True)])  # fmt: skip
    image = plots.plot_losses([plots.protection_panel([{"step": 0, "dpo": 0.7}]), attack], (1200, 400))
    assert image.size == (1200, 400)
    assert plots.plot_losses([attack], (500, 300), bins=10, tight=False).size == (500, 300)
