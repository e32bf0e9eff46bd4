"""Benchmark what the UI adds to a run: the same protection on a tiny model called directly and
through the app's event functions (worker thread, progress events, polling, loss-curve images),
and the cost of one loss-curve image. CPU, no download, a few minutes.

    python tools/bench_ui.py --repeats 3

Prints one line per measurement (median of the repeats) and the machine load, since a shared
machine's load moves these numbers more than the code does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's apdm_core, and tests/helpers

from helpers import draw_photo  # noqa: E402

from apdm_core import ui  # noqa: E402
from apdm_core.config import ProtectConfig  # noqa: E402
from apdm_core.protection import protect  # noqa: E402
from apdm_core.tiny import build_tiny_model  # noqa: E402

SETTINGS = dict(outer_steps=6, inner_steps=4, num_class_images=2, sample_steps=2, guidance_scale=2.0,
                lr_protect=1e-4, lr_personalize=1e-4, device="cpu", save_every=0)  # fmt: skip


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="apdm-bench-ui-"))
    build_tiny_model(root / "tiny")
    (root / "subject").mkdir()
    for i in range(4):
        draw_photo(i).save(root / "subject" / f"img_{i}.png")
    config = ProtectConfig(model=str(root / "tiny"), images=[str(root / "subject")], cache_dir=str(root / "cache"),
                           **SETTINGS)  # fmt: skip
    protect(config)  # warm-up: imports, and the cached pairs/class images both paths then reuse

    app = ui.ProtectApp(ui.Host(output_dir=root / "out"))
    values = {**ProtectConfig.from_preset("quick").to_dict(), **config.to_dict()}
    inputs = [values[name] for name in ui.ADVANCED_FIELDS]

    def through_app():
        views = list(app.protect_events(config.model, None, config.images[0], config.instance_prompt,
                                        config.class_prompt, *inputs))  # fmt: skip
        assert "Protected in" in views[-1].status, views[-1].status

    direct = [timed(lambda: protect(config)) for _ in range(args.repeats)]
    via_app = [timed(through_app) for _ in range(args.repeats)]
    steps = SETTINGS["outer_steps"] * SETTINGS["inner_steps"]
    d, a = statistics.median(direct), statistics.median(via_app)
    print(f"protect, tiny model, {steps} inner steps: direct {d:.2f} s, through the app {a:.2f} s "
          f"({(a - d) / d * 100:+.1f}%)")  # fmt: skip

    for n in (300, 16_000):  # a quick run / the paper's 800 x 20
        curves = {"protect": [(i, {"per": 1.0 / i, "protect": 0.5 + 0.1 / i}) for i in range(1, n + 1)]}
        ui.curve_image(curves)
        t = statistics.median(timed(lambda c=curves: ui.curve_image(c)) for _ in range(args.repeats))
        print(f"loss-curve image, {n} steps x 2 series: {t * 1000:.0f} ms")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
