"""Atomic writes and hashing: outputs appear complete or not at all, inputs are never touched."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import APDMError, InputError


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


def check_target(path: Path, overwrite: bool, protected: tuple[Path, ...] = ()) -> None:
    """Refuse to write over an existing output (unless asked), over an input, inside an input or
    around one (resolved paths, both ways), or over a folder this tool did not write."""
    resolved = Path(path).resolve()
    for p in protected:
        if p is None or not Path(p).exists():
            continue
        src = Path(p).resolve()
        if resolved == src:
            raise InputError(
                f"{path}: this is an input file; choose another output name (inputs are never overwritten)."
            )
        if src.is_dir() and _inside(resolved, src):
            raise InputError(f"{path} lies inside the input {p}; write the output somewhere else.")
        if _inside(src, resolved):
            raise InputError(f"{path} contains the input {p}; choose an output that holds no input.")
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; choose another name or pass overwrite=True (--overwrite).")
    if path.is_dir() and not (path / MARKER).exists():
        raise InputError(
            f"{path} is a folder that apdm did not write (it has no {MARKER} file); apdm never deletes or "
            "replaces such a folder. Choose another output name, or move the folder away yourself."
        )


def _disk_full_message(path: Path, exc: OSError) -> APDMError:
    return APDMError(
        f"Writing {path} failed: the disk is full ({exc.strerror}). Free some space in {path.parent} "
        "or choose another output folder; nothing was written."
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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
            raise InputError(f"{path} is a {kind}; choose another name (a {kind} is never replaced by a "
                             f"{'file' if kind == 'folder' else 'folder'}).")  # fmt: skip
        if path.is_dir():
            aside = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, aside)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        if aside is not None and not path.exists():
            os.replace(aside, path)  # put the old folder back
            aside = None
        if exc.errno == errno.ENOSPC:
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
