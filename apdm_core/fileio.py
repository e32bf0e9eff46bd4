"""Atomic writes and hashing: outputs appear complete or not at all, inputs are never touched."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import APDMError, InputError
from .interrupts import uninterrupted

log = logging.getLogger(__name__)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


MARKER = ".apdm-output"  # written into every folder the tool creates; only such folders are ever replaced


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def shown(path) -> str:
    """A path as text that can always be printed or logged (undecodable bytes of a file name, which
    Python keeps as surrogates, shown as \\xNN)."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def require_utf8(path, what: str) -> None:
    """Model files and folders need names that are valid UTF-8: the model libraries (safetensors,
    tokenizers) cannot open any other. Photos may have any name."""
    try:
        str(Path(path).resolve()).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"The {what} {shown(path)} has a name (or lies in a folder) that is not valid UTF-8; the model "
            "libraries (safetensors, tokenizers) cannot read or write such paths. Rename it (or the folder)."
        ) from None


MAX_INPUT_FILES = 10_000  # files of an input folder whose identities the path rule compares


def _file_ids(path: Path) -> set[tuple[int, int]]:
    """(device, inode) of the file ``path`` or of the files in the folder ``path`` (hard links share it)."""
    ids: set[tuple[int, int]] = set()
    try:
        if path.is_file():
            st = path.stat()
            return {(st.st_dev, st.st_ino)}
        for n, f in enumerate(p for p in path.rglob("*") if p.is_file()):
            if n >= MAX_INPUT_FILES:
                break
            st = f.stat()
            ids.add((st.st_dev, st.st_ino))
    except OSError:
        pass
    return ids


def check_paths(writes, inputs) -> None:
    """The one rule for every path a run writes or deletes, applied before any work.

    ``writes``: (what, path) pairs (an output, a state file, a cache folder, a saved config, a report);
    ``inputs``: (what, path) pairs (the model file or folder, the photos and their folders, class
    images, config files) - PIL images and paths that do not exist are skipped. A written path may
    not be an input, lie inside one or contain one, compared after resolving symlinks (both ways),
    nor be a hard link to an input file (the same device and inode). A cache folder (a write named
    "cache ...") may hold inputs: apdm writes only its own hashed sub-folders there, never replaces it.
    Raises InputError naming both paths.
    """
    items = [
        (what, Path(p)) for what, p in inputs if isinstance(p, (str, Path)) and str(p) and Path(p).exists()
    ]
    resolved = [(what, p, p.resolve()) for what, p in items]
    ids: dict[tuple[int, int], tuple[str, Path]] = {}
    for what, p, _ in resolved:
        for i in _file_ids(p):
            ids.setdefault(i, (what, p))
    for label, w in writes:
        if w is None or not str(w):
            continue
        w = Path(w)
        wr = w.resolve()
        for what, p, src in resolved:
            fix = f"choose another {label}, outside the inputs (apdm never writes, moves or deletes an input)"
            if wr == src:
                raise InputError(f"The {label} {shown(w)} is the input {what} {shown(p)} itself; {fix}.")
            if src.is_dir() and _inside(wr, src):
                raise InputError(f"The {label} {shown(w)} lies inside the input {what} {shown(p)}; {fix}.")
            if _inside(src, wr) and not label.startswith("cache"):
                raise InputError(f"The {label} {shown(w)} contains the input {what} {shown(p)}; {fix}.")
        if w.is_file() or w.is_symlink():
            hit = ids.get(next(iter(_file_ids(w)), None))
            if hit is not None:
                raise InputError(
                    f"The {label} {shown(w)} is a hard link to the input {hit[0]} {shown(hit[1])} (the same file "
                    f"under another name); choose another {label}, outside the inputs."
                )


def check_target(path: Path, overwrite: bool, protected: tuple[Path, ...] = ()) -> None:
    """Refuse to write over an existing output (unless asked), over an input, inside an input or
    around one (``check_paths``), or over a folder this tool did not write."""
    path = Path(path)
    check_paths([("output", path)], [("input", p) for p in protected if p is not None])
    recover_aside(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; choose another name or pass overwrite=True (--overwrite).")
    if path.is_dir() and not (path / MARKER).exists():
        raise InputError(
            f"{path} is a folder that apdm did not write (it has no {MARKER} file); apdm never deletes or "
            "replaces such a folder. Choose another output name, or move the folder away yourself."
        )


def _disk_full_message(path: Path, exc: BaseException) -> APDMError:
    why = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:200]
    return APDMError(
        f"Writing {shown(path)} failed: the disk is full ({why}). Free some space in {shown(path.parent)} "
        "or choose another output folder; nothing was written (an earlier file of that name is intact)."
    )


# What writers say when the disk fills up: OSError ENOSPC/EDQUOT; torch.save's zip writer
# ("file write failed", "unexpected pos"); safetensors ("No space left on device").
_DISK_FULL_WORDS = ("no space left", "file write failed", "unexpected pos", "disk quota exceeded")


def is_disk_full(exc: BaseException) -> bool:
    """Whether a writer's exception means the disk (or the quota) is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(w in str(exc).lower() for w in _DISK_FULL_WORDS)


def _asides(path: Path) -> list[Path]:
    """Earlier versions of the folder ``path`` that a replace set aside (``.name.old-PID``)."""
    try:
        return sorted(p for p in path.parent.glob(f".{glob_escape(path.name)}.old-*") if p.is_dir())
    except OSError:
        return []


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def recover_aside(path: Path) -> None:
    """Mend what an interrupted folder replace left: when ``path`` is missing and the old version of
    the folder lies aside, put it back; an aside left after a finished replace is deleted (apdm's
    folders only, told by their marker). Each is said in the log."""
    for aside in _asides(path):
        if not (aside / MARKER).exists():
            continue
        if not path.exists():
            os.replace(aside, path)
            log.warning(
                "%s: an interrupted replace had set this folder aside as %s; it is back in place.",
                shown(path),
                aside.name,
            )
        else:
            shutil.rmtree(aside, ignore_errors=True)
            log.warning(
                "%s: removed %s, the old version left by an interrupted replace.", shown(path), aside.name
            )


@contextlib.contextmanager
def atomic_path(
    path: str | Path, overwrite: bool = False, protected: tuple[Path, ...] = ()
) -> Iterator[Path]:
    """Yield a temporary path in the target folder; on success rename it to ``path``.

    Works for a file or a folder (whatever the caller creates at the temporary path); a folder
    gets the ``MARKER`` file that later lets the tool replace it. On any error the temporary is
    removed and an existing ``path`` stays intact. An existing folder is replaced only when this
    tool wrote it, and never deleted before the new one is in place: old -> aside, new -> in,
    then the old one is removed. A file never replaces a folder or the other way round.
    """
    path = Path(path)
    check_target(path, overwrite, protected)
    path.parent.mkdir(parents=True, exist_ok=True)
    # an ASCII temporary name: libraries that write inside it (tokenizers) refuse undecodable names
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in path.name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{safe}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the caller creates a file or a folder here
    aside = None
    try:
        yield tmp
        if tmp.is_dir():
            (tmp / MARKER).write_text("written by apdm; apdm may replace this folder\n", encoding="utf-8")
        if path.exists() and path.is_dir() != tmp.is_dir():
            kind = "folder" if path.is_dir() else "file"
            raise InputError(
                f"{shown(path)} is a {kind}; choose another name (a {kind} is never replaced by a "
                f"{'file' if kind == 'folder' else 'folder'})."
            )
        with uninterrupted():  # old aside and new in: one unit for Ctrl-C (recover_aside mends a kill)
            if path.is_dir():
                aside = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, aside)
            os.replace(tmp, path)
    except Exception as exc:
        _remove(tmp)
        if aside is not None and not path.exists():
            os.replace(aside, path)  # put the old folder back
            aside = None
        if is_disk_full(exc):
            raise _disk_full_message(path, exc) from exc
        raise
    except BaseException:
        _remove(tmp)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def make_work_dir(path: str | Path) -> Path:
    """Create (or reuse) a working folder of the tool, marked so that ``remove_work_dir`` may delete it."""
    path = Path(path)
    if path.exists() and not (path / MARKER).exists():
        raise InputError(
            f"{path} exists and was not made by apdm (no {MARKER} file); move it away or choose another output."
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("apdm working folder\n", encoding="utf-8")
    return path


def remove_work_dir(path: str | Path) -> None:
    """Delete a folder made by ``make_work_dir`` / ``atomic_path``; refuse any other folder."""
    path = Path(path)
    if not path.exists():
        return
    if not (path / MARKER).exists():
        raise InputError(f"{path} was not made by apdm (no {MARKER} file); it is left as it is.")
    shutil.rmtree(path, ignore_errors=True)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = True) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def child_path(folder: str | Path, name: str, suffix: str = "") -> Path:
    """``folder/name`` for a user-typed file name, refusing anything that would leave ``folder``.

    For hosts where the user types a name (ComfyUI, the Gradio tab). Sub-folders are allowed
    (``protected/alice``); absolute paths, ``..``, drive letters, control characters and
    hidden names are refused with an InputError. ``suffix`` (e.g. ``.safetensors``) is appended
    when the name does not already end with it.
    """
    raw = str(name).strip().replace("\\", "/")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    bad = (
        not parts
        or raw.startswith("/")
        or any(p == ".." or p.startswith(".") for p in parts)
        or ":" in raw
        or any(ord(c) < 32 or c in '<>"|?*' for c in raw)
    )
    if bad:
        raise InputError(
            f"{name!r} is not a valid file name: use letters, digits, '-', '_' and '/' for sub-folders, "
            "without '..', a leading '/' or '.', or a drive letter (e.g. 'protected/my_model')."
        )
    if suffix and not parts[-1].lower().endswith(suffix.lower()):
        parts[-1] += suffix
    root = Path(folder).resolve()
    path = root.joinpath(*parts)
    if root != path.resolve() and root not in path.resolve().parents:  # a symlink pointing outside
        raise InputError(f"{name!r} resolves outside {root}; choose a name inside that folder.")
    return path
