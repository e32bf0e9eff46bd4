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


def natural_texture(size: int = 128, seed: int = 0, alpha: float = 1.5) -> Image.Image:
    """A photo-like image: random phases with a 1/f^alpha amplitude spectrum, as natural images have."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.fftfreq(size)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    channels = []
    for _ in range(3):
        img = np.real(
            np.fft.ifft2((rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / f**alpha)
        )
        channels.append((img - img.mean()) / img.std())
    return Image.fromarray((np.stack(channels, -1) * 40 + 128).clip(0, 255).astype(np.uint8))


def white_noise(size: int = 128, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))
