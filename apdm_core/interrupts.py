"""Ctrl-C at the right moment: a block that a SIGINT cannot cut in two."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def uninterrupted():
    """Defer Ctrl-C (SIGINT) to the end of the block: an update and its step counter are one unit.

    A training loop saves its resumable state when interrupted; an interrupt that landed between
    "the weights changed" and "the step counter moved" would save a state that re-applies the
    step on resume. Inside this block a SIGINT is only recorded, and raised as KeyboardInterrupt
    once the block is done. Outside the main thread (where Python delivers no signals) it does
    nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not allowed here (an embedded interpreter): nothing to defer
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
