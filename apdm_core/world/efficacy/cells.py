"""The cells of the table (one row, subject and seed after some attack steps) and the cache that keeps the
unprotected rows' cells across benchmark runs, keyed by everything they depend on."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Cell:
    """The numbers of one row for one (subject, seed), after ``steps`` attack steps."""

    row: str
    subject: int
    seed: int
    similarity: float
    identity_match: float
    class_quality: float | None = None
    unrelated_quality: float | None = None
    protect_s: float = 0.0
    attack_s: float = 0.0
    gated: float | None = None  # class-gated similarity (None in tables written before it existed)
    class_rate: float | None = None  # fraction of the instance-prompt samples recognised as the class
    steps: int | None = None  # attack steps done when scored (None: the row's standard budget)
    weight_change: float | None = None  # ||theta_attacked - theta|| / ||theta|| of the UNet (dreambooth)
    backdoor: float | None = None  # PersGuard rows: fraction of samples showing the backdoor
    psnr: float | None = None  # image-level rows: mean PSNR / SSIM of the protected photos vs the originals
    ssim: float | None = None

    @property
    def score(self) -> float:
        """The similarity the tables compare: gated where measured, else the raw similarity."""
        return self.similarity if self.gated is None else self.gated


class ResultCache:
    """Cells of unprotected rows (base, scratch) kept in a JSON file across benchmark runs.

    Their numbers do not depend on any protection setting, and research runs compare many
    protections against the same unprotected and from-scratch curves.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.data: dict[str, list[dict]] = {}
        self._reload()

    def _reload(self) -> None:
        """Take in what the file holds now (other benchmark processes write it too); the file wins over this
        process's copy, which would otherwise put back cells they replaced."""
        if self.path is not None and self.path.exists():
            self.data = {**self.data, **json.loads(self.path.read_text())}

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def get(self, key: str) -> list[Cell] | None:
        self._reload()  # what other processes added since
        items = self.data.get(key)
        return cells_from_dicts(items) if items is not None else None

    def put(self, key: str, cells: list[Cell]) -> None:
        """Add ``cells`` under ``key`` to the file (under a lock, after taking in what it holds now); a curve keeps
        the budgets of the cells it had (one attack run's cells at other budgets)."""
        if self.path is None:
            return
        from ...fileio import atomic_write_text

        with _locked(self.path):
            self._reload()
            new = cells_to_dicts(cells)
            steps = {c["steps"] for c in new}
            kept = [c for c in self.data.get(key, []) if c["steps"] not in steps]
            self.data[key] = sorted(kept + new, key=lambda c: (c["steps"] is None, c["steps"] or 0))
            atomic_write_text(self.path, json.dumps(self.data))


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path``.lock for a read-modify-write of ``path`` (where the OS has flock)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; two processes writing at the same moment may lose one's cells
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def evaluator_fingerprint(evaluator) -> str:
    """sha256 of the evaluator's weights: cached scores are only reused with the same evaluator."""
    h = hashlib.sha256()
    for name, t in sorted(evaluator.net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cells_to_dicts(cells: list[Cell]) -> list[dict]:
    return [dataclasses.asdict(c) for c in cells]


def cells_from_dicts(items: list[dict]) -> list[Cell]:
    return [Cell(**item) for item in items]
