"""Load any model the engine takes: a diffusers folder or a single-file checkpoint.

Above both ``models`` (SDModel, diffusers folders) and ``checkpoint`` (single files, which build
an SDModel), so that neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_single_file
from .errors import InputError
from .fileio import require_utf8
from .models import SDModel, load_diffusers_folder


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kw
) -> SDModel:
    """Load a model from a diffusers folder (``models``) or a single-file checkpoint (``checkpoint``)."""
    path = Path(path)
    if not str(path):
        raise InputError("No model given: pass --model with a diffusers folder or a .safetensors checkpoint.")
    if not path.exists():
        raise InputError(
            f"Model {path} does not exist; pass a diffusers folder or a .safetensors checkpoint."
        )
    require_utf8(path, "model")
    if path.is_dir():
        model = load_diffusers_folder(path, dtype=dtype)
    else:
        model = load_single_file(path, dtype=dtype, **kw)
    for m in (model.unet, model.vae, *model.text_encoders):
        m.requires_grad_(False)
        m.eval()
    return model.to(device)
