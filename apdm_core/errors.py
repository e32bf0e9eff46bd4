"""Exceptions the engine raises. Every message names the file or setting at fault and the fix."""

from __future__ import annotations


class APDMError(Exception):
    """Base class for errors a user can act on (hosts show the message as is)."""


class InputError(APDMError, ValueError):
    """Bad user input: an unreadable or tiny image, a missing model, an invalid option."""


class TrainingDiverged(APDMError, FloatingPointError):
    """A loss became NaN or infinite."""


class Cancelled(APDMError):
    """Raised inside a loop when the host asked to stop; the loops turn it into a clean result."""
