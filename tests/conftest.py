"""Shared fixtures: a tiny SD-shaped model saved as a diffusers folder, subject photos, fast configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray download must fail loudly, not hang
# benchmark code the tests check (benchmarks/perf_tools.py: the reference L2P, the memory formula)
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

from helpers import draw_photo  # noqa: E402

from apdm_core.config import ProtectConfig  # noqa: E402
from apdm_core.tiny import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_model(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vpred_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny_v"
    build_tiny_model(folder, prediction_type="v_prediction")
    return folder


@pytest.fixture()
def subject_dir(tmp_path) -> Path:
    folder = tmp_path / "subject"
    folder.mkdir()
    for i in range(4):
        draw_photo(i).save(folder / f"img_{i}.png")
    return folder


@pytest.fixture()
def fast_config(tiny_model_dir, subject_dir, tmp_path):
    """A ProtectConfig that runs in about a second on the tiny model."""

    def make(**overrides) -> ProtectConfig:
        values = dict(
            model=str(tiny_model_dir),
            images=[str(subject_dir)],
            cache_dir=str(tmp_path / "cache"),
            outer_steps=3,
            inner_steps=2,
            num_class_images=2,
            sample_steps=2,
            guidance_scale=2.0,
            lr_protect=1e-4,
            lr_personalize=1e-4,
            device="cpu",
            save_every=0,
        )
        values.update(overrides)
        return ProtectConfig(**values)

    return make
