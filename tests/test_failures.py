"""The README's "Failure handling" table, row by row (the rows tested elsewhere name their test there).

Every test here hashes its inputs before and after: nothing in this list may modify an input.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
from helpers import tree_hashes
from PIL import Image

from apdm_core.data import load_subject_images
from apdm_core.errors import InputError


def load(folder, size=64):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {s.name: np.asarray(s.image) for s in load_subject_images(folder, size)}


def test_grayscale_cmyk_16_bit_and_animated_photos_are_read_as_they_look(tmp_path):
    Image.new("L", (300, 300), 128).save(tmp_path / "gray.png")
    Image.new("CMYK", (300, 300), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    Image.fromarray(np.full((300, 300), 32768, np.uint16)).save(tmp_path / "deep.png")  # 16-bit mid gray
    frames = [Image.new("RGB", (300, 300), c) for c in ((0, 0, 255), (255, 0, 0))]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], duration=100)
    before = tree_hashes(tmp_path)
    images = load(tmp_path)
    assert images["gray"].mean() == pytest.approx(128, abs=1)
    assert images["cmyk"][..., 0].mean() > 200 and images["cmyk"][..., 1:].mean() < 60
    assert images["deep"].mean() == pytest.approx(128, abs=2)  # not clipped to white
    assert images["anim"][..., 2].mean() > 200  # the first frame (blue)
    assert tree_hashes(tmp_path) == before


def test_a_huge_photo_is_refused_with_the_fix(tmp_path, monkeypatch):
    """Above Pillow's decompression-bomb limit (2 x MAX_IMAGE_PIXELS, ~179 MP, e.g. 14000 x 14000);
    lowered here so that the test writes a small file."""
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    before = tree_hashes(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 3)
    with pytest.raises(InputError, match="big.png is too large to open safely.*downscale"):
        load(tmp_path)
    assert tree_hashes(tmp_path) == before


def test_kill_9_during_a_save_leaves_the_previous_state(tmp_path):
    """A process killed while writing never leaves a half-written file under the real name."""
    target = tmp_path / "run.pt"
    target.write_bytes(b"the previous state")
    code = (
        "import os, signal, sys\n"
        "from apdm_core.fileio import atomic_path\n"
        f"with atomic_path({str(target)!r}, overwrite=True) as tmp:\n"
        "    tmp.write_bytes(b'half a new st')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"the previous state"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "run.pt"]
    assert all(n.startswith(".run.pt.") and n.endswith(".tmp") for n in leftovers)  # a hidden temp at most


def test_inputs_survive_a_whole_protection_run(fast_config, tmp_path):
    """The end-to-end row: model folder and photos are byte-identical after protect + export."""
    from apdm_core.protection import protect

    cfg = fast_config(output=str(tmp_path / "out"), outer_steps=1)
    roots = [os.path.abspath(cfg.model), os.path.abspath(cfg.images[0])]
    from pathlib import Path

    before = tree_hashes(*map(Path, roots))
    protect(cfg)
    assert tree_hashes(*map(Path, roots)) == before
