"""Helpers shared by the tests (importable: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def draw_photo(seed: int, size: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(im)
    x, y = rng.integers(5, size // 3, 2)
    d.ellipse((x, y, x + size // 2, y + size // 2), fill=(220, 30, 30))
    return im


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the given folders/files (to prove inputs were not modified)."""
    out = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in paths:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
