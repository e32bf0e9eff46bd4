"""What differs between the standalone app and the A1111/Forge tab (``scripts/apdm_tab.py`` subclasses ``Host``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..progress import ProgressEvent
from .forms import BASIC_PRESETS


class Host:
    """The standalone app's behaviour; A1111/Forge override the hooks (scripts/apdm_tab.py)."""

    name = "standalone"
    presets: tuple[str, ...] = BASIC_PRESETS

    def __init__(
        self,
        model: str = "",
        images: str = "",
        output_dir: str | Path = "apdm_out/models",
        preset: str = "quick",
        config: dict[str, Any] | None = None,
        attack: dict[str, Any] | None = None,
        evaluation: dict[str, Any] | None = None,
        report_dir: str | Path = "apdm_out/reports",
    ) -> None:
        self.model, self.images, self.preset = model, images, preset
        self.output_dir, self.report_dir = Path(output_dir), Path(report_dir)
        # the page's first values (e.g. `apdm ui --config`); a preset click replaces the protection's
        self.config = dict(config or {})
        self.attack = dict(attack or {})
        self.evaluation = dict(evaluation or {})

    keep_on_device = True  # False: models go back to the CPU after each job (A1111 shares its GPU)

    # --- models and files --------------------------------------------------------------------
    def model_choices(self) -> list[str] | None:
        """Choices for a model dropdown, or None for a free path box."""
        return None

    def refresh_models(self) -> list[str] | None:
        return self.model_choices()

    def resolve_model(self, value: str) -> str:
        """The file or folder behind what the user picked."""
        return str(value or "").strip()

    def output_path(self, filename: str) -> Path:
        """Where Save writes: a name (sub-folders allowed) inside the app's output folder, nothing else."""
        from ..fileio import child_path

        name = str(filename or "").strip()
        if not name:
            raise InputError("Give the protected model a file name (e.g. protected.safetensors) to save it.")
        return child_path(self.output_dir, name)

    def saved(self, path: Path) -> None:
        """Called after a model was written (A1111 refreshes its checkpoint list here)."""

    # --- running ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, kind: str) -> Iterator[None]:
        """Around every job, on its worker thread (A1111: GPU lock, free VRAM, shared.state)."""
        yield

    def progress(self, event: ProgressEvent) -> None:
        """Every progress event of a job (A1111 mirrors it into shared.state)."""

    def should_stop(self) -> bool:
        """A host-side interrupt (A1111: shared.state.interrupted)."""
        return False


# ------------------------------------------------------------------------------------------
# jobs
# ------------------------------------------------------------------------------------------
Work = Callable[[Callable[[ProgressEvent], None], Callable[[], bool]], Any]
