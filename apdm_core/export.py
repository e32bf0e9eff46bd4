"""Write a (protected) model: a single .safetensors file in the original layout, or a diffusers folder.

Single-file export starts from the source checkpoint's own tensors and replaces only the
UNet's: VAE and text-encoder tensors (including SD2's ``resblocks.23`` and
``text_projection``, which diffusers does not load) are copied byte for byte, the dtype of
every tensor stays that of the source unless asked, and the UNet key mapping comes from
diffusers' own LDM -> diffusers conversion (``convert_ldm_unet_checkpoint`` run on a state
dict whose values are their own keys), so the file loads in ComfyUI and A1111 as is.

EMA copies of the UNet (``model_ema.*``) are dropped: they would hold the unprotected weights.

Safetensors metadata (all strings): ``apdm.tool``, ``apdm.version``, ``apdm.protected``,
``apdm.method``, ``apdm.model_type``, ``apdm.prediction_type``, ``apdm.config`` (the settings
without local paths, the instance prompt as a salted hash), ``apdm.source_sha256``,
``apdm.subjects`` (salted sha256 of each subject image file, never the images or names),
``apdm.created``, ``apdm.dropped``; the source's other metadata is kept.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .card import CARD_FILE, MEASURED_FILE, card_path, model_card, modelspec
from .checkpoint import (
    EMA_PREFIX,
    MODEL_TYPES,
    UNET_PREFIX,
    CheckpointFile,
    model_family,
    read_checkpoint,
)
from .errors import InputError
from .fileio import atomic_path, check_target, require_utf8, sha256_file
from .models import SDModel
from .progress import ProgressCallback, StopCheck, Tracker

log = logging.getLogger(__name__)

TOOL = "apdm-protect"


def method_description(config) -> str:
    """The protection method of ``config`` (a ProtectConfig or its recorded dict) in one line."""
    from .methods import get_method

    name = config.get("method", "apdm") if isinstance(config, dict) else config.method
    return get_method(name).description


# ProtectConfig fields that are local paths: never written into a shared file.
PRIVATE_FIELDS = ("model", "images", "output", "class_images", "cache_dir", "state_path", "backdoor_images")
# The protection record of a protected diffusers folder (the safetensors metadata of a single file).
CONFIG_FILE, SUBJECTS_FILE = "apdm_config.json", "apdm_subjects.json"
SUBJECT_SCHEME = "sha256(salt || sha256(image file bytes)); in-memory images: sha256 of mode|size|RGB bytes"
DTYPES = {"source": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------
# key mapping (derived from diffusers' own conversion)
# ------------------------------------------------------------------------------------------
def unet_key_map(ckpt: CheckpointFile, unet) -> dict[str, str]:
    """diffusers UNet key -> key in the checkpoint, for every tensor of ``unet``.

    Runs diffusers' ``convert_ldm_unet_checkpoint`` on {ldm_key: ldm_key}: the conversion
    only renames, so each converted value names the source tensor of its diffusers key.
    Refuses (InputError) unless the two sides match one to one with equal shapes, so no
    UNet tensor of the source can survive unprotected.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ldm = [k for k in ckpt.keys() if k.startswith(UNET_PREFIX)]
    converted = convert_ldm_unet_checkpoint({k: k for k in ldm}, dict(unet.config))
    mapping = {d: src for d, src in converted.items() if isinstance(src, str)}
    params = unet.state_dict()
    missing = sorted(set(params) - set(mapping))
    unmapped = sorted(set(ldm) - set(mapping.values()))
    extra = sorted(set(mapping) - set(params))
    if missing or unmapped or extra or len(set(mapping.values())) != len(mapping):
        example = (missing or unmapped or extra or ["duplicate targets"])[0]
        raise InputError(
            f"{ckpt.path}: its UNet does not match the model's ({len(missing)} model tensors have no place in the "
            f"file, {len(unmapped) + len(extra)} file tensors have no counterpart; e.g. {example}). Export from "
            "the checkpoint the model was loaded from (--template)."
        )
    for d, src in mapping.items():
        if tuple(params[d].shape) != ckpt.shape(src):
            raise InputError(
                f"{ckpt.path}: {src} has shape {list(ckpt.shape(src))} but the model's {d} has "
                f"{list(params[d].shape)}; the template is another model (pass the one the model came from)."
            )
    return mapping


# ------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------
def _salted(salt: bytes, digest: bytes) -> str:
    return hashlib.sha256(salt + digest).hexdigest()


def image_digest(image) -> bytes:
    """sha256 of an image file's bytes, or of an in-memory PIL image's mode, size and RGB bytes."""
    if hasattr(image, "tobytes"):
        rgb = image.convert("RGB")
        return hashlib.sha256(f"{rgb.mode}|{rgb.size}|".encode() + rgb.tobytes()).digest()
    return bytes.fromhex(sha256_file(image))


def _subject_items(images) -> list:
    from .data import find_images

    if images is None or (isinstance(images, (list, tuple)) and not images) or images == "":
        return []
    if isinstance(images, (list, tuple)) and all(hasattr(i, "tobytes") for i in images):
        return list(images)
    return find_images(images)


def subject_record(images, salt: bytes) -> dict[str, Any]:
    """Salted hashes of the protected subject images (sorted, so file order and names leak nothing)."""
    items = _subject_items(images)
    return {
        "scheme": SUBJECT_SCHEME,
        "salt": salt.hex(),
        "count": len(items),
        "hashes": sorted(_salted(salt, image_digest(i)) for i in items),
    }


def match_subjects(record: dict[str, Any], images) -> list[tuple[str, bool]]:
    """For each given image (paths or a folder, or PIL images): whether it is one of the protected subjects."""
    salt, known = bytes.fromhex(record["salt"]), set(record.get("hashes", []))
    items = _subject_items(images)
    names = [
        (getattr(i, "filename", "") or f"image_{n:03d}") if hasattr(i, "tobytes") else str(i)
        for n, i in enumerate(items)
    ]
    return [(name, _salted(salt, image_digest(i)) in known) for name, i in zip(names, items)]


HASHED = "salted-sha256:"


def public_config(config, salt: bytes) -> dict[str, Any]:
    """The protection settings without local paths; the instance prompt (it may name the subject) hashed.

    ``config``: a ProtectConfig, or settings already recorded by this function (a dict, e.g. a
    protected diffusers folder's ``apdm_config.json``), which come back unchanged.
    """
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data = {k: v for k, v in data.items() if k not in PRIVATE_FIELDS}

    def hashed(prompt) -> str:
        prompt = str(prompt or "")
        return prompt if prompt.startswith(HASHED) else HASHED + _salted(salt, prompt.encode("utf-8"))

    data["instance_prompt"] = hashed(data.get("instance_prompt"))
    if data.get("subjects"):  # the other subjects of the run: their prompts as the first one's, no paths
        data["subjects"] = [{"instance_prompt": hashed(s.get("instance_prompt")), "class_prompt": s.get("class_prompt")}
                            for s in data["subjects"]]  # fmt: skip
    model_type = data.get("model_type")
    if model_type and model_type != "auto" and model_type not in MODEL_TYPES:  # a config folder: its name
        data["model_type"] = Path(model_type).name
    return data


def is_subject_record(value) -> bool:
    """Whether ``value`` is a record made by ``subject_record`` (not images)."""
    return isinstance(value, dict) and "salt" in value and "hashes" in value


def protection_record(config, subjects=None, source=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings, subject record) of a protection, as every written model carries them.

    One salt for the instance prompt's hash and the subject hashes. ``subjects``: the subject
    images (a folder, files or PIL images; default the config's ``images``), or a record made
    earlier (kept as it is, with its salt: a protected folder converted to a single file).
    ``source``: the checkpoint the protection started from; the rounds it records stay in
    ``record['earlier']`` (a subject added to an already protected model keeps the earlier ones listed).
    """
    if is_subject_record(subjects):
        return public_config(config, bytes.fromhex(subjects["salt"])), subjects
    salt = os.urandom(16)
    earlier = earlier_rounds(source)
    if subjects is None:
        subjects = config.get("images") if isinstance(config, dict) else config.images
    try:
        record = subject_record(subjects, salt)
    except InputError as exc:  # the photos moved since the run: say so rather than fail the export
        record = {"scheme": SUBJECT_SCHEME, "salt": salt.hex(), "count": None, "hashes": [], "note": str(exc)}
    settings = public_config(config, salt)
    record["subjects"] = 1 + len(settings.get("subjects") or [])
    if earlier:  # a protection of a checkpoint that was protected before: its rounds stay on record
        record["earlier"] = earlier
    return settings, record


def earlier_rounds(source) -> list[dict]:
    """The protection rounds a source checkpoint records (a protected single file or folder): its own
    subject record (with the method and date) after the rounds before it; [] for an unprotected source."""
    if not source:
        return []
    path = Path(source)
    try:
        if path.is_dir():
            settings, record = read_protection(path)
            method, created = (settings or {}).get("method"), None
        elif path.suffix.lower() == ".safetensors":
            meta = read_apdm_metadata(read_checkpoint(path).metadata)
            record, method, created = meta.get("subjects"), meta.get("method"), meta.get("created")
        else:
            return []
    except (InputError, OSError, ValueError):
        return []
    if not is_subject_record(record):
        return []
    this = {k: v for k, v in record.items() if k != "earlier"}
    return [*record.get("earlier", []), {**this, "method": method, "created": created}]


def apdm_metadata(
    model: SDModel, ckpt: CheckpointFile, source_sha256: str, config=None, subjects=None, dropped=None
) -> dict[str, str]:
    """The safetensors metadata of an export: the source's own keys (minus old apdm.*) plus ours."""
    family = model_family(ckpt)[0]
    model_type = family + ("-v" if family != "sd1" and model.prediction_type == "v_prediction" else "")
    meta = {k: v for k, v in ckpt.metadata.items() if not k.startswith(("apdm.", "modelspec."))}
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta.update(
        {
            "apdm.tool": TOOL,
            "apdm.version": __version__,
            "apdm.protected": "true" if config is not None else "false",
            "apdm.method": method_description(config)
            if config is not None
            else "none (format conversion, no protection applied)",
            "apdm.model_type": model_type,
            "apdm.prediction_type": model.prediction_type,
            "apdm.source_sha256": source_sha256,
            "apdm.created": created,
        }
    )
    record = None
    if config is not None:
        settings, record = protection_record(config, subjects, model.source)
        meta["apdm.config"] = json.dumps(settings, sort_keys=True)
        meta["apdm.subjects"] = json.dumps(record, sort_keys=True)
    meta.update(modelspec(ckpt.metadata, model_type, model.prediction_type, Path(ckpt.path).stem, created,
                          config is not None, (record or {}).get("count") and record.get("subjects"),
                          model.info.get("thumbnail")))  # fmt: skip
    if model.info.get("measured"):
        meta["apdm.measured"] = json.dumps(model.info["measured"], sort_keys=True)
    if dropped:
        meta["apdm.dropped"] = json.dumps(dropped, sort_keys=True)
    return meta


def read_apdm_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """The apdm.* keys of a file's metadata, JSON values decoded."""
    out: dict[str, Any] = {}
    for k, v in metadata.items():
        if k.startswith("apdm."):
            try:
                decoded = ("apdm.config", "apdm.subjects", "apdm.dropped", "apdm.measured")
                out[k[5:]] = json.loads(v) if k in decoded else v
            except json.JSONDecodeError:
                out[k[5:]] = v
    return out


# ------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------
@dataclass
class ExportPlan:
    """What a single-file export will do, checked before anything is written (or trained)."""

    template: CheckpointFile
    key_map: dict[str, str]  # diffusers UNet key -> checkpoint key
    protected: tuple[Path, ...]  # inputs that must never be overwritten
    dropped: dict[str, Any] = field(default_factory=dict)


def _template_path(model: SDModel, template) -> Path | CheckpointFile:
    if template:
        return Path(template)
    if isinstance(model.info.get("template"), CheckpointFile):  # loaded from a host's model in memory
        return model.info["template"]
    if model.source and Path(model.source).is_file():
        return Path(model.source)
    raise InputError(
        f"A single-file export starts from the original checkpoint's tensors, but this model was loaded from "
        f"{model.source or 'memory'} (not a single file). Pass the .safetensors it was converted from "
        "(template=..., --template FILE), or write a diffusers folder (an output path without .safetensors)."
    )


def plan_export(
    model: SDModel,
    output: str | Path,
    overwrite: bool = False,
    template=None,
    allow_pickle: bool | None = None,
    inputs: tuple[Path, ...] = (),
) -> ExportPlan:
    """Validate a single-file export (target, template, key mapping) without writing anything."""
    output = Path(output)
    if output.suffix.lower() != ".safetensors":
        raise InputError(
            f"{output}: single-file outputs are written as .safetensors only (pickle .ckpt files are never "
            "written); use a name ending in .safetensors, or no suffix for a diffusers folder."
        )
    path = _template_path(model, template)
    if allow_pickle is None:
        allow_pickle = bool(model.info.get("allow_pickle")) and model.source and Path(model.source) == path
    files = () if isinstance(path, CheckpointFile) else (path,)
    protected = tuple({*files, *((Path(model.source),) if model.source else ()), *map(Path, inputs)})
    check_target(output, overwrite, protected)
    ckpt = (
        path if isinstance(path, CheckpointFile) else read_checkpoint(path, allow_pickle=bool(allow_pickle))
    )
    key_map = unet_key_map(ckpt, model.unet)
    dropped: dict[str, Any] = {}
    ema = [k for k in ckpt.keys() if k.startswith(EMA_PREFIX)]
    if ema:
        dropped["model_ema.*"] = f"{len(ema)} tensors: an EMA copy of the unprotected UNet"
    if ckpt.extras:
        dropped["non-tensor entries"] = sorted(map(str, ckpt.extras))
    return ExportPlan(ckpt, key_map, protected, dropped)


def check_export(
    model: SDModel, output: str | Path, overwrite: bool = False, template=None, inputs: tuple[Path, ...] = ()
) -> None:
    """Fail early (before hours of training) when ``output`` could not be written for ``model``.

    ``inputs``: other input files or folders (subject photos, class images) the output must not
    be, lie in, or contain.
    """
    output = Path(output)
    require_utf8(output, "output")
    if output.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        plan_export(model, output, overwrite, template, inputs=inputs)
        sources = ((Path(model.source),) if model.source else ()) + tuple(map(Path, inputs))
        check_target(card_path(output), overwrite, sources)  # the model card beside the file
    else:
        check_target(
            output, overwrite, ((Path(model.source),) if model.source else ()) + tuple(map(Path, inputs))
        )


def export_single_file(
    model: SDModel,
    output: str | Path,
    *,
    config=None,
    overwrite: bool = False,
    template: str | Path | None = None,
    dtype: str = "source",
    subjects=None,
    allow_pickle: bool | None = None,
    inputs: tuple[Path, ...] = (),
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> Path:
    """Write ``model`` as one .safetensors file in the layout of its source checkpoint (or ``template``).

    Only the UNet tensors are replaced; everything else is the source's, byte for byte.
    ``dtype``: 'source' (keep each tensor's dtype), or 'fp16'/'bf16'/'fp32' for all float tensors.
    ``config``: the ProtectConfig of the run (recorded without paths); ``subjects``: the subject
    images when they are not the files in ``config.images`` (e.g. PIL images).
    """
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r} is not valid; choose one of {', '.join(DTYPES)}.")
    output = Path(output)
    plan = plan_export(model, output, overwrite, template, allow_pickle, inputs)
    ckpt, target_dtype = plan.template, DTYPES[dtype]
    tracker = Tracker("export", 3, progress, should_stop)
    source_sha256 = ckpt.sha256()
    tracker.update(message="hashed the source")
    unet_state = model.unet.state_dict()
    by_src = {src: d for d, src in plan.key_map.items()}
    keep = [k for k in ckpt.keys() if k not in by_src and not k.startswith(EMA_PREFIX)]
    tensors = ckpt.tensors(keep)
    if ckpt.format == "pickle":  # tensors of a pickle may share storage; safetensors refuses that
        tensors = {k: v.clone() for k, v in tensors.items()}
    for src, d in by_src.items():
        tensors[src] = unet_state[d].detach().to("cpu", ckpt.index[src][1]).contiguous()
    if target_dtype is not None:
        tensors = {k: v.to(target_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = {k: tensors[k] for k in ckpt.keys() if k in tensors}  # the source's order
    metadata = apdm_metadata(model, ckpt, source_sha256, config, subjects, plan.dropped)
    tracker.update(message="prepared the tensors")
    with atomic_path(output, overwrite=overwrite, protected=plan.protected) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    if config is not None:
        with atomic_path(card_path(output), overwrite=overwrite, protected=plan.protected) as tmp:
            tmp.write_text(card_text(model, output, read_apdm_metadata(metadata)), encoding="utf-8")
    tracker.update(message=f"wrote {output}")
    log.info("Exported %s (%d UNet tensors replaced, source %s)", output, len(by_src), ckpt.path)
    return output


def write_model(
    model: SDModel,
    output: str | Path,
    *,
    config=None,
    overwrite: bool = False,
    subjects=None,
    inputs: tuple[Path, ...] = (),
    **kw,
) -> Path:
    """Write ``model`` to ``output``: a .safetensors single file, or else a diffusers folder.

    With ``config`` (a protection's settings), a single file carries them in its metadata and a
    folder in ``apdm_config.json`` + ``apdm_subjects.json``, by the same rules: no local paths,
    the instance prompt and the ``subjects`` images as salted hashes (``protection_record``).
    """
    from .models import save_diffusers

    output = Path(output)
    if output.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        return export_single_file(
            model, output, config=config, overwrite=overwrite, subjects=subjects, inputs=inputs, **kw
        )
    extra = None
    if config is not None:
        settings, record = protection_record(config, subjects, model.source)
        extra = {CONFIG_FILE: json.dumps(settings, indent=2), SUBJECTS_FILE: json.dumps(record, indent=2)}
        measured = model.info.get("measured") or []
        if measured:
            extra[MEASURED_FILE] = json.dumps(measured, indent=2)
        record_all = {
            "method": method_description(config),
            "config": settings,
            "subjects": record,
            "measured": measured,
        }
        extra[CARD_FILE] = card_text(model, output, record_all)
    return save_diffusers(model, output, overwrite=overwrite, extra_files=extra, inputs=inputs)


def card_text(model: SDModel, output: Path, record: dict[str, Any]) -> str:
    """The model card of an export from its protection record (method, config, subjects, measured)."""
    title = Path(model.source).stem if model.source else Path(output).stem
    return model_card(title, record.get("method", ""), record.get("config"), record.get("measured") or [],
                      record.get("subjects"))  # fmt: skip


def read_subject_record(path: str | Path) -> dict | None:
    """The subject record of a protected export (single file or folder); None otherwise."""
    path = Path(path)
    try:
        if path.is_dir():
            return read_protection(path)[1]
        if path.suffix.lower() == ".safetensors":
            return read_apdm_metadata(read_checkpoint(path).metadata).get("subjects")
    except (InputError, OSError, ValueError):
        return None
    return None


def read_measured(path: str | Path) -> list[dict]:
    """The protection tests recorded in an export (a single file's metadata or a folder's
    apdm_measured.json); [] when there are none."""
    path = Path(path)
    try:
        if path.is_dir():
            f = path / MEASURED_FILE
            return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else []
        if path.suffix.lower() == ".safetensors":
            return read_apdm_metadata(read_checkpoint(path).metadata).get("measured") or []
    except (OSError, ValueError):
        return []
    return []


def read_protection(folder: str | Path) -> tuple[Any, Any]:
    """(settings, subject record) written into a protected diffusers folder; (None, None) otherwise."""
    folder = Path(folder)
    files = [folder / CONFIG_FILE, folder / SUBJECTS_FILE]
    if not files[0].is_file():
        return None, None
    try:
        return tuple(json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None for f in files)
    except (OSError, ValueError) as exc:
        raise InputError(f"Cannot read the protection record in {folder}: {exc}") from exc
