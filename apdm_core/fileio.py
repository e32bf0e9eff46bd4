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


def check_target(path: Path, overwrite: bool, protected: tuple[Path, ...] = ()) -> None:
    """Refuse to write over an existing output (unless asked) or over any input file."""
    resolved = path.resolve()
    for p in protected:
        if p is not None and Path(p).exists() and resolved == Path(p).resolve():
            raise InputError(
                f"{path}: this is an input file; choose another output name (inputs are never overwritten)."
            )
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; choose another name or pass overwrite=True (--overwrite).")


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

    Works for a file or a folder (whatever the caller creates at the temporary path).
    On any error the temporary is removed and an existing ``path`` stays intact.
    """
    path = Path(path)
    check_target(path, overwrite, protected)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the caller creates a file or a folder here
    try:
        yield tmp
        if path.is_dir() and overwrite:
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        if exc.errno == errno.ENOSPC:
            raise _disk_full_message(path, exc) from exc
        raise
    except BaseException:
        _remove(tmp)
        raise


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
