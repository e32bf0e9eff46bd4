"""The built-in demo world: procedural subjects, a pretrained tiny SD-shaped model, an identity evaluator.

- ``render``: classes and individual subjects drawn from seeds, their photos and prompts;
- ``pretrain``: the recipe that trains the world model (``apdm world pretrain``);
- ``evaluator``: the identity evaluator (``apdm world train-evaluator``);
- ``assets/model``: the shipped world model, a diffusers folder loaded by ``load_model``;
  ``assets/model_xl``: the SDXL-shaped world model (``apdm world pretrain --arch sdxl``: two text
  encoders, pooled embedding and size ids, the same photos, VAE and evaluator);
  ``assets/evaluator.safetensors``: the shipped evaluator.

Light to import: torch-heavy parts load on first use.
"""

from __future__ import annotations

import importlib
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
WORLD_MODEL_DIR = ASSETS / "model"
WORLD_MODEL_DIRS = {"sd": WORLD_MODEL_DIR, "sdxl": ASSETS / "model_xl"}  # by PretrainConfig.arch
EVALUATOR_PATH = ASSETS / "evaluator.safetensors"

_LAZY = {
    "Subject": "render",
    "make_subject": "render",
    "photos": "render",
    "class_prompt": "render",
    "instance_prompt": "render",
    "CLASSES": "render",
    "Evaluator": "evaluator",
    "load_evaluator": "evaluator",
    "PretrainConfig": "pretrain",
    "pretrain": "pretrain",
}


def load_world_model(device: str = "cpu", arch: str = "sd"):
    """The shipped world model (``arch="sdxl"``: the SDXL-shaped one) through the same ``load_model`` path
    as any SD folder."""
    from ..errors import InputError
    from ..loading import load_model

    if arch not in WORLD_MODEL_DIRS:
        raise InputError(
            f"No demo world of architecture {arch!r}; choose one of {', '.join(WORLD_MODEL_DIRS)}."
        )
    folder = WORLD_MODEL_DIRS[arch]
    if not (folder / "model_index.json").exists():
        flag = " --arch sdxl" if arch == "sdxl" else ""
        raise InputError(
            f"The demo world model is missing from {folder}; recreate it with "
            f"`apdm world pretrain --out {folder}{flag}` (or reinstall the package)."
        )
    return load_model(folder, device=device)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
