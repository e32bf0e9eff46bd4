"""The one run driver: what a protection, an attack and an image protection share around their loop.

- **Files.** Every path a run writes or deletes (its output, state file, cache folder) is checked
  against every input it reads (the model, the photos and their folders, class images) by the one
  path rule (``fileio.check_paths``: resolved symlinks both ways, hard links) before any work, and
  the places it will write are checked for write access and room (``preflight``), so a read-only
  folder or a full disk is found before the training, not after it.
- **State file policy.** A saved state is continued (``resume``) or replaced (``restart``), never
  silently started over; both together are refused; a file at the state path that apdm did not
  write (a photo, a model) is never replaced or deleted (``is_apdm_state``).
- **Loop and finish.** ``loop`` runs ``training.resumable_loop`` with the state saves; ``finish``
  writes the output and only then deletes the state file. A failed write (disk full, a folder
  made read-only meanwhile) saves the state first, so running again with ``--resume`` only redoes
  the write.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import APDMError, InputError
from .fileio import check_paths, shown
from .training import STATE_MARKER, read_state, resumable_loop, run_hash, state_file, write_state

log = logging.getLogger(__name__)


def check_flags(resume: bool, restart: bool) -> None:
    if resume and restart:
        raise InputError(
            "--resume and --restart contradict each other: --resume continues the saved run, --restart "
            "starts over and replaces its state. Pass one of them."
        )


def check_run_files(output: str, state_path: str, cache_dir: str, inputs) -> None:
    """The one path rule for a run's own files (output, state file, cache folder), before anything is
    loaded; a default state path, known once the run's identity is, is checked by ``RunDriver.open``."""
    check_paths(
        [("output", output), ("state file", state_path), ("cache folder", cache_folder(cache_dir))], inputs
    )


def is_apdm_state(path: Path) -> bool:
    """Whether ``path`` is a state file apdm wrote: a torch zip archive whose pickle holds apdm's
    state keys. Only such files are ever replaced or deleted as state files (reads only the small
    pickle record, not the tensors)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return False
            record = z.read(name)
    except (OSError, zipfile.BadZipFile):
        return False
    # files written before the marker existed carry the identity and the settings
    return STATE_MARKER.encode() in record or (b"identity" in record and b"history" in record)


def source_paths(**named) -> list[tuple[str, Path]]:
    """(what, path) pairs of a run's inputs from named values: a path, a list of paths, or things that
    are not paths (PIL images, empty strings, None), which are left out."""
    out: list[tuple[str, Path]] = []
    for what, value in named.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, (str, Path)) and str(v):
                out.append((what.replace("_", " "), Path(v)))
    return out


def cache_folder(cache_dir: str) -> Path:
    from .pairs import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir()


def module_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of ``modules`` (the size of what writing them takes)."""
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def _existing_ancestor(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def preflight(writes: Iterable[tuple[str, Path, int]]) -> None:
    """Before any work: each place a run will write can be written, with room for what it writes.

    ``writes``: (what, path, expected bytes). The folder of each path (or its nearest existing
    ancestor, which the run would create it in) must accept a new file, and each file system must
    have the room the writes on it need together.
    """
    need: dict[int, tuple[Path, int]] = {}
    for what, path, size in writes:
        if path is None or not str(path):
            continue
        folder = _existing_ancestor(Path(path).parent)
        if not folder.is_dir():
            raise InputError(
                f"The {what} {shown(path)} cannot be made: {shown(folder)} is a file, not a folder."
            )
        try:
            fd, probe = tempfile.mkstemp(prefix=".apdm-probe-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise InputError(
                f"The {what} {shown(path)} cannot be written: {shown(folder)} does not accept new files "
                f"({exc.strerror}). Choose a folder you can write to, or fix its permissions."
            ) from None
        dev = folder.stat().st_dev
        _, total = need.get(dev, (folder, 0))
        need[dev] = (folder, total + int(size))
    for folder, size in need.values():
        free = shutil.disk_usage(folder).free
        if size > free:
            raise InputError(
                f"Not enough room in {shown(folder)}: this run will write about {size / 2**20:.0f} MiB there "
                f"(output and state file), {free / 2**20:.0f} MiB are free. Free some space or choose another "
                "folder (--out, --state-path)."
            )


@dataclass(frozen=True)
class RunKind:
    """What differs between the runs the driver serves: their name, state file and what may grow."""

    what: str  # "protection", "attack", "image protection": named in messages
    suffix: str  # the state file beside the output: <output><suffix>
    folder: str  # else in the cache: <cache>/<folder>/<identity>.pt
    version: int  # of the state dict
    grows: str  # the setting a resumed run may raise


@dataclass
class RunDriver:
    """The state file of one run and the policy around it (see the module docstring)."""

    kind: RunKind
    state_path: Path
    identity: str
    settings: dict  # recorded in the state file
    resume: bool = False
    writer: bool = True  # False in the other processes of a distributed run: one process writes

    @classmethod
    def open(
        cls,
        kind: RunKind,
        config,
        identity_settings: dict,
        model,
        subjects,
        inputs: list[tuple[str, Path]],
        *,
        state_path: str | None = None,
        resume: bool = False,
        restart: bool = False,
        writer: bool = True,
    ) -> RunDriver:
        """The run's identity and state file (``state_path``, default ``config.state_path``, else beside
        ``config.output`` or in ``config.cache_dir``), checked: never an input, never a file apdm did not
        write, never silently started over."""
        check_flags(resume, restart)
        identity = run_hash(identity_settings, model, subjects)
        path = state_file(state_path or config.state_path, config.output, config.cache_dir, identity, kind.suffix,
                          kind.folder)  # fmt: skip
        if path.is_dir():
            raise InputError(
                f"The state path {shown(path)} is a folder; a state path must be a file name (e.g. run.pt)."
            )
        check_paths([("state file", path)], inputs)
        if path.exists() or path.is_symlink():
            if not is_apdm_state(path):
                raise InputError(
                    f"The state path {shown(path)} is a file apdm did not write (not a saved run state); apdm "
                    "never replaces or deletes it. Choose another --state-path (state_path)."
                )
            if not resume and not restart:  # never start over silently, then delete it
                raise InputError(
                    f"{shown(path)} holds the saved state of an interrupted {kind.what}. Continue it with --resume "
                    "(resume=True), or start over with --restart (restart=True), which replaces it."
                )
        return cls(kind, path, identity, config.to_dict(), resume, writer)

    @property
    def what(self) -> str:
        return self.kind.what

    def preflight(self, output: str, output_bytes: int, state_bytes: int) -> None:
        """Before any work: the output's and the state file's folders take new files, with room for both."""
        preflight([("output", output, output_bytes), ("state file", self.state_path, state_bytes)])

    # --- the state file --------------------------------------------------------------------
    def load(self) -> dict | None:
        """The saved state to continue (with ``resume`` and a state file), else None."""
        if not (self.resume and self.state_path.exists()):
            return None
        return read_state(
            self.state_path, self.identity, self.kind.version, what=self.what_word, grows=self.kind.grows
        )

    @property
    def what_word(self) -> str:
        return "run" if self.what == "protection" else self.what

    def save(self, state: dict) -> Path:
        if not self.writer:  # the processes hold the same weights: one writes
            return self.state_path
        return write_state(
            self.state_path, {"version": self.kind.version, **state}, self.identity, self.settings
        )

    def discard(self) -> None:
        """Delete the state file (a finished run's); only ever one apdm wrote."""
        if self.writer and self.state_path.exists() and is_apdm_state(self.state_path):
            self.state_path.unlink()

    # --- the loop and the end ---------------------------------------------------------------
    def loop(
        self,
        step: Callable[[], object],
        position: Callable[[], int],
        total: int,
        *,
        tracker,
        state: Callable[[], dict | None],
        state_interrupted: Callable[[], dict | None] | None = None,
        save_every: int = 0,
        before: Callable[[], object] | None = None,
    ) -> bool:
        """``resumable_loop`` with this run's saves; ``state()`` returns the state to save (None: keep
        the last saved one, e.g. when stopped inside an update). True when cancelled."""

        def saver(make: Callable[[], dict | None]) -> Callable[[], None]:
            def save() -> None:
                snapshot = make()
                if snapshot is None:
                    log.warning(
                        "Interrupted inside an update; the last saved state (if any) at %s stays.",
                        shown(self.state_path),
                    )
                else:
                    self.save(snapshot)

            return save

        return resumable_loop(
            step,
            position,
            total,
            tracker=tracker,
            save=saver(state),
            save_interrupted=saver(state_interrupted or state),
            save_every=save_every,
            state_path=self.state_path,
            before=before,
        )

    def finish(self, write: Callable[[], Path | None], state: Callable[[], dict], keep_state: bool = False):
        """Write the output, then drop the state file (unless ``keep_state``: then it is saved).

        A write that fails saves the finished run's state first and says so: ``--resume`` then only
        redoes the write."""
        try:
            out = write()
        except BaseException as exc:
            try:
                self.save(state())
            except Exception as save_exc:  # e.g. the same full disk: the last saved state stays
                log.warning("The finished run's state could not be saved either (%s).", save_exc)
                raise
            note = (
                f"The finished {self.what} is kept in {shown(self.state_path)}: fix the cause and run the same "
                "command again with --resume (resume=True) to write the output without training again."
            )
            if isinstance(exc, APDMError):
                raise type(exc)(f"{exc} {note}") from exc
            exc.state_path = self.state_path
            log.error(note)
            raise
        if keep_state:
            self.save(state())
        else:
            self.discard()
        return out
