"""A long task on a worker thread with progress and a stop flag; the ``View`` a running job shows."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import APDMError
from ..progress import ProgressEvent
from .host import Host, Work
from .view import LossCurves, curve_image

log = logging.getLogger(__name__)


class Job:
    """Runs ``work(progress, should_stop)`` on a daemon thread inside ``host.session``."""

    def __init__(self, kind: str, work: Work, host: Host, names: dict[str, str] | None = None) -> None:
        self.kind, self.host, self._work = kind, host, work
        self.names = dict(names or {})  # display names of loss series
        self._curve, self._curve_key = None, -1
        self.stop_requested = threading.Event()
        self.event: ProgressEvent | None = None
        self._losses = LossCurves()
        self.curves = self._losses.series  # series -> [(step, losses)]; "attack", then "attack #2"
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"apdm-{kind}", daemon=True)

    def start(self) -> Job:
        self._thread.start()
        return self

    def curve(self):
        """The loss curves as an image, redrawn only when new points arrived (followers share it)."""
        curves = {k: list(v) for k, v in dict(self.curves).items()}  # a snapshot: the worker appends
        key = sum(len(points) for points in curves.values())
        if key != self._curve_key:
            self._curve, self._curve_key = curve_image(curves, self.names), key
        return self._curve

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self.running

    def stop(self) -> None:
        self.stop_requested.set()

    def _progress(self, event: ProgressEvent) -> None:
        self.event = event
        self._losses.add(event)
        self.host.progress(event)

    def _should_stop(self) -> bool:
        return self.stop_requested.is_set() or bool(self.host.should_stop())

    def _run(self) -> None:
        try:
            with self.host.session(self.kind):
                self.result = self._work(self._progress, self._should_stop)
        except BaseException as exc:  # shown in the UI; a worker thread has nobody else to tell
            self.error = exc
            if not isinstance(exc, APDMError):
                log.exception("APDM %s failed", self.kind)


def describe_error(exc: BaseException) -> str:
    """One line for the page: the engine's own message, or the exception with a hint."""
    if isinstance(exc, APDMError):
        return str(exc)
    if "out of memory" in str(exc).lower():
        return (
            f"Out of memory ({type(exc).__name__}). Reduce memory: mixed_precision=bf16, a smaller "
            "resolution, batch_size 1, or close other programs using the GPU."
        )
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------
# what the page shows
# ------------------------------------------------------------------------------------------
@dataclass
class View:
    """The state of the page's run area; ``build_blocks`` turns it into component updates."""

    status: str  # HTML
    running: bool = False
    curve: Any = None  # PIL image of the loss curves, or None to leave the shown one
    filename: str | None = None  # a suggested Save name once a protection finished
    done: bool = False  # the job this view follows has ended
    report: dict | None = None  # a finished test: grid / losses (PIL images), summary (Markdown), folder
