"""Single-file Stable Diffusion checkpoints (original CompVis/LDM key layout), fully offline.

- ``read_checkpoint``: open a .safetensors file (or, only when the user opts in, a pickle
  .ckpt loaded with ``torch.load(weights_only=True)``): keys, shapes, dtypes, metadata.
- ``CheckpointFile.from_state_dict``: the same for a checkpoint in memory (a host's model).
- ``detect_model_type`` (``detection.py``): SD1.x / SD2.x / SD2.x-v from the tensors.
- ``load_single_file`` / ``load_checkpoint``: the components via diffusers' own single-file conversion
  (``from_single_file`` with ``config=<local folder>``, ``local_files_only=True``) and the
  config folders shipped in ``apdm_core/sd_configs``; nothing is downloaded.

The CLIP tokenizer of SD1.x and SD2.x (one BPE vocabulary; SD2 pads with "!") is rebuilt
from ``sd_configs/clip_merges.txt.gz`` (see ``clip_vocab``) and loaded with
``CLIPTokenizer.from_pretrained``.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .clip_tokenizer import load_tokenizer
from .detection import (  # noqa: F401  (re-exported: the names callers know from this module)
    CONFIG_ROOT,
    EMA_PREFIX,
    MODEL_TYPE_HELP,
    MODEL_TYPES,
    OLD_SD1_TEXT_KEY,
    SD1_TEXT_MODEL,
    SD1_TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    Detection,
    config_dir,
    detect_model_type,
    family_of,
    model_family,
    resolve_model_type,
)
from .errors import InputError
from .models import SDModel, _load_scheduler

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ------------------------------------------------------------------------------------------
# reading a file
# ------------------------------------------------------------------------------------------
@dataclass
class CheckpointFile:
    """A single-file checkpoint: tensor index (shape, dtype), metadata, tensors on demand."""

    path: Path
    format: str  # "safetensors" or "pickle"
    index: dict[str, tuple[tuple[int, ...], torch.dtype]]
    metadata: dict[str, str] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # non-tensor entries of a pickle (global_step ...)
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _sha256: str = field(default="", repr=False)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], name: str, metadata=None) -> CheckpointFile:
        """A checkpoint that exists only in memory (e.g. ComfyUI's MODEL/CLIP/VAE as ComfyUI would save
        them): the same key layout as a file, ``name`` in place of its path in messages."""
        # copies: the engine trains its UNet in place, and the caller's tensors may be a host's live weights
        tensors = {
            k: v.detach().to("cpu", copy=True) for k, v in state.items() if isinstance(v, torch.Tensor)
        }
        if not tensors:
            raise InputError(
                f"{name}: no tensors; connect the MODEL, CLIP and VAE of a Stable Diffusion model."
            )
        index = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
        return cls(Path(name), "memory", index, dict(metadata or {}), {}, tensors)

    @property
    def in_memory(self) -> bool:
        return self.format == "memory"

    def sha256(self) -> str:
        """The file's sha256; for a checkpoint in memory, of its keys, dtypes, shapes and bytes in key order."""
        from .fileio import sha256_file

        if not self.in_memory:
            return sha256_file(self.path)
        import hashlib

        if self._sha256:
            return self._sha256
        h = hashlib.sha256()
        for k in sorted(self.index):
            t = self._tensors[k].detach().to("cpu").contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        self._sha256 = h.hexdigest()  # of the tensors as they came in (before any training)
        return self._sha256

    def keys(self) -> list[str]:
        return list(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def shape(self, key: str) -> tuple[int, ...]:
        return self.index[key][0]

    def tensor(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def tensors(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The given tensors, unchanged (same dtype and bytes as in the file)."""
        if self._tensors is not None:
            return {k: self._tensors[k] for k in keys}
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, in file order (safetensors: read from disk; pickle: already in memory)."""
        if self._tensors is not None:
            return dict(self._tensors)
        from safetensors.torch import load_file

        try:
            return load_file(str(self.path))
        except Exception as exc:
            raise InputError(
                f"{self.path}: cannot read the tensors ({exc}); the file may be truncated, re-download it."
            ) from exc


def sniff_format(path: Path) -> str:
    """'safetensors', 'pickle' or 'unknown', from the first bytes (not the file name)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (100 << 20):
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch zip archive, or a legacy pickle
        return "pickle"
    return "unknown"


def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> CheckpointFile:
    """Open a single-file checkpoint; pickle files only with ``allow_pickle`` (then ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file; pass a .safetensors checkpoint.")
    fmt = sniff_format(path)
    if fmt == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                index = {}
                for k in f.keys():
                    sl = f.get_slice(k)
                    index[k] = (tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.uint8))
        except Exception as exc:
            raise InputError(
                f"{path} is not a readable safetensors file ({exc}); re-download or re-export it."
            ) from exc
        return CheckpointFile(path, "safetensors", index, metadata)
    if fmt == "pickle":
        if not allow_pickle:
            raise InputError(
                f"{path} is a pickle checkpoint (.ckpt/.pt); pickle files can run code when loaded, so they are "
                "refused by default. Prefer a .safetensors version of the model. If you trust this file, opt in "
                "(--allow-pickle / allow_pickle=True): it is then read with torch.load(weights_only=True), e.g. "
                f"`apdm export --model {path} --allow-pickle --out {path.with_suffix('.safetensors')}` converts it once."
            )
        if not safe_weights_only():
            raise InputError(
                f"{path} is a pickle checkpoint, and torch {torch.__version__} cannot load pickles safely: "
                "torch.load(weights_only=True) can run code before torch 2.6 (CVE-2025-32434). Convert the file "
                "with a torch >= 2.6 (`apdm export --model FILE.ckpt --allow-pickle --out FILE.safetensors`) or "
                "get a .safetensors version of the model."
            )
        return _read_pickle(path)
    raise InputError(
        f"{path} is neither a safetensors nor a PyTorch checkpoint; pass a .safetensors file or a diffusers folder."
    )


def safe_weights_only(version: str | None = None) -> bool:
    """Whether this torch's ``torch.load(weights_only=True)`` is safe for untrusted files (>= 2.6)."""
    v = (version or torch.__version__).split("+")[0].split(".")
    try:
        return (int(v[0]), int(v[1])) >= (2, 6)
    except (ValueError, IndexError):
        return False


def _read_pickle(path: Path) -> CheckpointFile:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"{path} contains objects other than tensors, which torch.load(weights_only=True) refuses ({exc}). "
            "Use a .safetensors version of this model."
        ) from exc
    except Exception as exc:
        raise InputError(f"{path} cannot be read as a PyTorch checkpoint ({exc}); re-download it.") from exc
    extras: dict[str, Any] = {}
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning-style nesting
        extras.update(
            {k: v for k, v in obj.items() if k != "state_dict" and not isinstance(v, (dict, torch.Tensor))}
        )
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(f"{path} does not hold a state dict; pass a Stable Diffusion checkpoint.")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    extras = {**extras, **{k: v for k, v in obj.items() if not isinstance(v, torch.Tensor)}}
    index = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    return CheckpointFile(path, "pickle", index, {}, extras, tensors)


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------
def _check_complete(path: Path, name: str, module) -> None:
    missing = [n for n, p in module.named_parameters() if p.is_meta]
    if missing:
        raise InputError(
            f"{path}: the {name} tensors do not match the expected layout ({len(missing)} missing, e.g. "
            f"{missing[0]}); the file is damaged or of another model type (try --model-type)."
        )


def load_single_file(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    model_type: str | None = None,
    allow_pickle: bool = False,
) -> SDModel:
    """Load an SD1.x/SD2.x single-file checkpoint offline into an SDModel (kind sd1/sd2/sd2-v).

    ``model.info`` records what export needs: the file format, the config folder and why the
    type was chosen; ``model.source`` is the file.
    """
    return load_checkpoint(read_checkpoint(Path(path), allow_pickle=allow_pickle), dtype, model_type)


def load_checkpoint(
    ckpt: CheckpointFile, dtype: torch.dtype = torch.float32, model_type: str | None = None
) -> SDModel:
    """An SDModel from an open checkpoint (a file, or one in memory: then ``model.source`` is empty and
    ``model.info['template']`` holds it, so a single-file export can start from its tensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    path = ckpt.path
    kind, cfg_dir, reasons = resolve_model_type(ckpt, model_type)
    if ckpt.in_memory:
        ckpt.sha256()  # now: the model's weights may share storage with these tensors
    state = ckpt.state_dict()
    if (
        OLD_SD1_TEXT_KEY in ckpt
    ):  # old CLIP names without "text_model.": alias them for diffusers (file unchanged)
        state.update(
            {
                SD1_TEXT_MODEL + k[len(SD1_TEXT_PREFIX) :]: v
                for k, v in state.items()
                if k.startswith(SD1_TEXT_PREFIX) and not k.startswith(SD1_TEXT_MODEL)
            }
        )
    common = {"config": str(cfg_dir), "local_files_only": True, "torch_dtype": dtype}
    xl: dict[str, Any] = {}
    try:
        unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", **common)
        vae = AutoencoderKL.from_single_file(state, subfolder="vae", **common)
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, state, subfolder="text_encoder", **common
        )
        if family_of(kind) == "sdxl":
            from transformers import CLIPTextModelWithProjection

            xl["text_encoder_2"] = create_diffusers_clip_model_from_ldm(
                CLIPTextModelWithProjection, state, subfolder="text_encoder_2", **common
            )
            xl["tokenizer_2"] = load_tokenizer(cfg_dir, "tokenizer_2")
    except (ValueError, RuntimeError, KeyError, AttributeError) as exc:
        raise InputError(
            f"{path}: could not load it as {MODEL_TYPE_HELP.get(kind, kind)} ({type(exc).__name__}: {exc}). "
            f"If the type is wrong, pass --model-type ({', '.join(MODEL_TYPES)} or a diffusers config folder)."
        ) from exc
    parts = [("UNet", unet), ("VAE", vae), ("text encoder", text_encoder)]
    parts += [("second text encoder", xl["text_encoder_2"])] if xl else []
    for name, module in parts:
        _check_complete(path, name, module)
    del state
    scheduler = _load_scheduler(cfg_dir)
    if "ztsnr" in ckpt:  # ComfyUI's marker of zero-terminal-SNR training (v-prediction SDXL fine-tunes)
        scheduler = type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)
        reasons = [*reasons, "zero terminal SNR: a 'ztsnr' key"]
    model = SDModel(
        unet,
        vae,
        text_encoder,
        load_tokenizer(cfg_dir),
        scheduler,
        source="" if ckpt.in_memory else str(path),
        kind=kind,
        **xl,
        info={
            "format": ckpt.format,
            "config_dir": str(cfg_dir),
            "detection": reasons,
            "allow_pickle": ckpt.format == "pickle",
            **({"template": ckpt} if ckpt.in_memory else {}),
        },
    )
    log.info("Loaded %s as %s (%s)", path, kind, "; ".join(reasons))
    return model
