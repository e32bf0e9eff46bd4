"""One progress/cancel protocol for every long loop (pairs, protection, attacks, evaluation).

A loop calls ``tracker.update(...)`` once per step. The tracker builds a ``ProgressEvent``
(with elapsed time and an ETA), hands it to the host's callback and then asks the host's
``should_stop()``; if it answers True, ``Cancelled`` is raised and the loop's owner turns
it into a clean, resumable result. Hosts map events to their own bars: tqdm (CLI),
comfy.utils.ProgressBar (ComfyUI), gr.Progress (Gradio), shared.state (A1111).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import Cancelled


@dataclass
class ProgressEvent:
    stage: str  # "pairs", "class_images", "encode", "protect", "attack", "sample", "evaluate"
    step: int  # steps done in this stage (1-based after the first step)
    total: int
    message: str = ""
    losses: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    eta_s: float | None = None
    outer: int | None = None  # L2P outer step (1-based), protection only
    inner: int | None = None  # L2P inner step (1-based), protection only

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 1.0

    def describe(self) -> str:
        """One line for logs and status bars."""
        parts = [f"{self.stage} {self.step}/{self.total}"]
        if self.outer is not None:
            parts.append(f"outer {self.outer} inner {self.inner}")
        parts += [f"{k}={v:.4g}" for k, v in self.losses.items()]
        if self.eta_s is not None:
            parts.append(f"ETA {format_seconds(self.eta_s)}")
        if self.message:
            parts.append(self.message)
        return "  ".join(parts)


ProgressCallback = Callable[[ProgressEvent], None]
StopCheck = Callable[[], bool]


def format_seconds(s: float) -> str:
    s = int(round(max(s, 0)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Tracker:
    """Counts steps of one stage, estimates the ETA from the steps done in this session."""

    def __init__(
        self,
        stage: str,
        total: int,
        progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
        start: int = 0,
    ) -> None:
        self.stage, self.total = stage, total
        self.progress, self.should_stop = progress, should_stop
        self.start = self.step = start
        self.t0 = time.perf_counter()

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"{self.stage} stopped at step {self.step}/{self.total}.")

    def update(self, n: int = 1, **info) -> ProgressEvent:
        self.step += n
        elapsed = time.perf_counter() - self.t0
        done = self.step - self.start
        eta = elapsed / done * (self.total - self.step) if done > 0 else None
        event = ProgressEvent(self.stage, self.step, self.total, elapsed_s=elapsed, eta_s=eta, **info)
        if self.progress is not None:
            self.progress(event)
        self.check_stop()
        return event


def tqdm_callback(desc: str = "apdm"):
    """A progress callback drawing one tqdm bar per stage (used by the CLI)."""
    from tqdm.auto import tqdm

    bars: dict[str, tqdm] = {}

    def callback(event: ProgressEvent) -> None:
        bar = bars.get(event.stage)
        if bar is None or bar.total != event.total:
            if bar is not None:
                bar.close()
            bar = bars[event.stage] = tqdm(
                total=event.total, desc=f"{desc} {event.stage}", initial=event.step - 1, dynamic_ncols=True
            )
        bar.update(event.step - bar.n)
        post = {k: f"{v:.4g}" for k, v in event.losses.items()}
        if event.outer is not None:
            post = {"outer": event.outer, **post}
        if post:
            bar.set_postfix(post, refresh=False)
        if event.step >= event.total:
            bar.close()
            bars.pop(event.stage, None)

    return callback
