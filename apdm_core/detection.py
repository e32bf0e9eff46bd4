"""Which Stable Diffusion a single-file checkpoint is, from its tensors: SD1.x / SD2.x (512, epsilon) /
SD2.x (768, v-prediction) from the text encoder (CLIP ViT-L vs OpenCLIP ViT-H keys), the UNet's proj_in
(conv vs linear) and, for SD2.x, the v-prediction hints (metadata, a ``v_pred`` key, the weight statistic
ComfyUI uses); other families (SDXL, SD3, FLUX, inpainting, ControlNet ...) by diffusers' own names, refused
with the reason. The key names of the original (CompVis/LDM) layout live here too."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    from .checkpoint import CheckpointFile


MODEL_TYPES = ("sd1", "sd2", "sd2-v", "sdxl", "sdxl-v")
MODEL_TYPE_HELP = {
    "sd1": "SD1.x (CLIP ViT-L text encoder, 512 px, epsilon)",
    "sd2": "SD2.x base (OpenCLIP ViT-H, 512 px, epsilon)",
    "sd2-v": "SD2.x (OpenCLIP ViT-H, 768 px, v-prediction)",
    "sdxl": "SDXL base (CLIP ViT-L + OpenCLIP bigG, 1024 px, epsilon)",
    "sdxl-v": "SDXL (CLIP ViT-L + OpenCLIP bigG, 1024 px, v-prediction)",
}
CONFIG_ROOT = Path(__file__).resolve().with_name("sd_configs")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
SD1_TEXT_KEY = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
SD2_TEXT_KEY = "cond_stage_model.model.token_embedding.weight"
SD1_TEXT_PREFIX, SD1_TEXT_MODEL = "cond_stage_model.transformer.", "cond_stage_model.transformer.text_model."
OLD_SD1_TEXT_KEY = (
    "cond_stage_model.transformer.embeddings.position_embedding.weight"  # pre-4.x transformers names
)
V_PRED_STAT_KEY = re.compile(r"output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias$")
V_PRED_STD = 0.09  # ComfyUI's SD20.model_type threshold on that tensor's std
SD2_BASE_GLOBAL_STEP = 875000  # diffusers' legacy hint for 512-base .ckpt files
# SDXL (SGM layout): CLIP ViT-L and OpenCLIP bigG under conditioner.embedders.0/.1, the added conditioning in label_emb
SDXL_TEXT_KEY = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
SDXL_TEXT2_KEY = "conditioner.embedders.1.model.positional_embedding"
SDXL_REFINER_KEY = "conditioner.embedders.0.model.positional_embedding"  # the refiner has OpenCLIP bigG only
SDXL_LABEL_KEY = UNET_PREFIX + "label_emb.0.0.weight"


def family_of(model_type: str) -> str:
    """sd1 / sd2 / sdxl for a model type (sd2-v -> sd2, sdxl-v -> sdxl)."""
    return model_type.removesuffix("-v")


def config_dir(model_type: str) -> Path:
    """The shipped diffusers config folder of a model type (sd1, sd2, sd2-v, sdxl, sdxl-v)."""
    if model_type not in MODEL_TYPES:
        raise InputError(f"Unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}.")
    return CONFIG_ROOT / model_type


# ------------------------------------------------------------------------------------------
# detection
# ------------------------------------------------------------------------------------------
@dataclass
class Detection:
    model_type: str  # sd1 / sd2 / sd2-v
    reasons: list[str]


# diffusers' names (single_file_utils.infer_diffusers_model_type) of the checkpoint types it knows
# that are not SD1.x/SD2.x text-to-image models, in words
OTHER_TYPES = {
    "xl_base": "an SDXL checkpoint",
    "xl_refiner": "an SDXL refiner checkpoint",
    "xl_inpaint": "an SDXL inpainting checkpoint",
    "playground-v2-5": "a Playground v2.5 checkpoint",
    "sd3": "an SD3 checkpoint",
    "sd35_medium": "an SD3.5 Medium checkpoint",
    "sd35_large": "an SD3.5 Large checkpoint",
    "flux-dev": "a FLUX.1-dev checkpoint",
    "flux-schnell": "a FLUX.1-schnell checkpoint",
    "flux-fill": "a FLUX.1 Fill checkpoint",
    "flux-depth": "a FLUX.1 Depth checkpoint",
    "inpainting": "an SD1.x inpainting checkpoint",
    "inpainting_v2": "an SD2.x inpainting checkpoint",
    "upscale": "an SD x4 upscaler checkpoint",
    "controlnet": "a ControlNet",
}


class _Shapes:
    """A checkpoint seen as a mapping of tensors that only have shapes (diffusers' type inference reads
    key names and shapes), without loading any tensor."""

    def __init__(self, ckpt: CheckpointFile) -> None:
        self.ckpt = ckpt

    def __contains__(self, key) -> bool:
        return key in self.ckpt

    def __getitem__(self, key):
        import types

        return types.SimpleNamespace(shape=self.ckpt.shape(key))

    def keys(self):
        return self.ckpt.keys()

    def __iter__(self):
        return iter(self.ckpt.keys())


def diffusers_model_type(ckpt: CheckpointFile) -> str | None:
    """What diffusers' single-file type inference calls this checkpoint ('v1', 'v2', 'xl_base', ...);
    None when it cannot tell (it is used to name other model types in errors, never to pick SD1/SD2:
    diffusers reads SD2 from a 1024-wide cross-attention, which tiny or pruned SD2 files lack)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        return infer_diffusers_model_type(_Shapes(ckpt))
    except Exception:  # a partial or odd file: diffusers' checks index keys it did not test for
        return None


def _not_sd_message(ckpt: CheckpointFile) -> str:
    keys = ckpt.keys()
    other = diffusers_model_type(ckpt)
    if other == "xl_base":
        what = (
            "an SDXL checkpoint (diffusers type 'xl_base') without its UNet (model.diffusion_model.*); "
            "pass the full checkpoint"
        )
    elif other in OTHER_TYPES:
        what = f"{OTHER_TYPES[other]} (diffusers type {other!r}); only SD1.x, SD2.x and SDXL base models are supported"
    elif any(k.startswith("conditioner.embedders.") for k in keys):
        what = "only the text encoders of an SDXL model (no model.diffusion_model.* UNet); pass the full checkpoint"
    elif any(k.startswith("control_model.") for k in keys):
        what = "a ControlNet (control_model.*), not a text-to-image checkpoint; protect the base model it is used with"
    elif any(
        k.startswith(("lora_unet_", "lora_te", "unet.", "text_encoder.")) or ".lora_" in k for k in keys
    ):
        what = "a LoRA or adapter file, not a full model checkpoint"
    elif "conv_in.weight" in ckpt or any(k.startswith("down_blocks.") for k in keys):
        what = "a single diffusers component (e.g. a UNet), not a full checkpoint; pass the diffusers folder"
    elif any(k.startswith(("encoder.", "decoder.")) for k in keys):
        what = "a VAE file, not a full model checkpoint"
    else:
        what = "not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet tensors)"
    return f"{ckpt.path} is {what}."


def _sdxl_family(ckpt: CheckpointFile) -> tuple[str, list[str]]:
    """'sdxl' for an SDXL base checkpoint; the refiner and files without both text encoders are refused."""
    if SDXL_REFINER_KEY in ckpt:
        raise InputError(
            f"{ckpt.path} is an SDXL refiner (one OpenCLIP text encoder at conditioner.embedders.0). The refiner only "
            "polishes the base model's latents and is not what DreamBooth personalizes; protect the SDXL base checkpoint."
        )
    missing = [n for n, k in (("CLIP ViT-L (conditioner.embedders.0)", SDXL_TEXT_KEY),
                              ("OpenCLIP bigG (conditioner.embedders.1)", SDXL_TEXT2_KEY)) if k not in ckpt]  # fmt: skip
    if missing:
        raise InputError(
            f"{ckpt.path} is an SDXL UNet without its text encoder{'s' if len(missing) > 1 else ''} "
            f"{' and '.join(missing)}; pass the full checkpoint (UNet + VAE + both text encoders), e.g. the file as "
            "ComfyUI's 'Save Checkpoint' or A1111 writes it."
        )
    if SDXL_LABEL_KEY not in ckpt:
        raise InputError(
            f"{ckpt.path} has SDXL text encoders but its UNet has no size/crop conditioning (label_emb); "
            "it is not a standard SDXL base model. Pass --model-type with a diffusers config folder that matches it."
        )
    return "sdxl", [
        "CLIP ViT-L + OpenCLIP bigG text encoders (conditioner.embedders.0/1)",
        "UNet with label_emb",
    ]


def model_family(ckpt: CheckpointFile) -> tuple[str, list[str]]:
    """'sd1', 'sd2' or 'sdxl' from the text encoder(s) and the UNet, checked against each other."""
    if f"{UNET_PREFIX}input_blocks.0.0.weight" not in ckpt:
        raise InputError(_not_sd_message(ckpt))
    in_ch = ckpt.shape(f"{UNET_PREFIX}input_blocks.0.0.weight")[1]
    if in_ch != 4:
        other = diffusers_model_type(ckpt)
        xl = SDXL_LABEL_KEY in ckpt
        what = (
            OTHER_TYPES["xl_inpaint"]
            if xl
            else OTHER_TYPES.get(other, "an inpainting or other special model")
        )
        raise InputError(
            f"{ckpt.path}: the UNet takes {in_ch} input channels ({what}); only text-to-image SD1.x/SD2.x/SDXL "
            "checkpoints (4 channels) are supported. Protect the text-to-image model the inpainting one was made from."
        )
    if f"{VAE_PREFIX}encoder.conv_in.weight" not in ckpt:
        raise InputError(
            f"{ckpt.path} has no VAE (first_stage_model.*); pass a full checkpoint with its VAE baked in."
        )
    if SDXL_LABEL_KEY in ckpt or any(k.startswith("conditioner.embedders.") for k in ckpt.keys()):
        return _sdxl_family(ckpt)
    if SD1_TEXT_KEY in ckpt or OLD_SD1_TEXT_KEY in ckpt:
        text, text_reason = "sd1", "CLIP ViT-L text encoder (cond_stage_model.transformer.*)"
    elif SD2_TEXT_KEY in ckpt:
        text, text_reason = "sd2", "OpenCLIP text encoder (cond_stage_model.model.*)"
    else:
        raise InputError(
            f"{ckpt.path} has no text encoder in the SD1.x/SD2.x layout (cond_stage_model.*); "
            "pass a full checkpoint (UNet + VAE + text encoder)."
        )
    proj = sorted(k for k in ckpt.keys() if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight"))
    if not proj:
        raise InputError(
            f"{ckpt.path}: the UNet has no cross-attention (proj_in) layers; not an SD1.x/SD2.x model."
        )
    linear = len(ckpt.shape(proj[0])) == 2
    unet = "sd2" if linear else "sd1"
    if unet != text:
        raise InputError(
            f"{ckpt.path}: the text encoder says {text.upper()} but the UNet's proj_in is "
            f"{'linear (SD2.x)' if linear else 'a 1x1 conv (SD1.x)'}; this mixed model is not a standard type. "
            "Pass --model-type with a diffusers config folder that matches it."
        )
    return text, [text_reason, f"UNet proj_in is {'linear' if linear else 'a 1x1 conv'}"]


def _metadata_prediction(meta: dict[str, str], family: str) -> tuple[bool, str] | None:
    """(v-prediction?, why) from apdm's or modelspec's metadata, or None when neither says."""
    if meta.get("apdm.model_type") in (family, f"{family}-v"):
        return meta["apdm.model_type"] == f"{family}-v", "apdm.model_type metadata"
    pred = meta.get("modelspec.prediction_type", "").lower()
    if pred in ("v", "v_prediction", "v-prediction", "epsilon", "eps"):
        return pred.startswith("v"), f"modelspec.prediction_type={pred!r} metadata"
    return None


def _v_prediction_hint(ckpt: CheckpointFile) -> tuple[bool, str]:
    """Whether an SD2.x file is v-prediction (768) rather than epsilon (512-base), and why."""
    meta = ckpt.metadata
    said = _metadata_prediction(meta, "sd2")
    if said is not None:
        return said
    arch = meta.get("modelspec.architecture", "")
    if arch.startswith("stable-diffusion-v2"):
        return arch.endswith("-v"), f"modelspec.architecture={arch!r} metadata"
    if "v_pred" in ckpt:
        return True, "a 'v_pred' key"
    if ckpt.extras.get("global_step") == SD2_BASE_GLOBAL_STEP:
        return False, f"global_step={SD2_BASE_GLOBAL_STEP} (the SD2 512-base release)"
    stats = [
        (int(m.group(1)), k)
        for k in ckpt.keys()
        if k.startswith(UNET_PREFIX) and (m := V_PRED_STAT_KEY.search(k))
    ]
    if stats:
        key = max(stats)[1]
        std = float(ckpt.tensor(key).float().std(unbiased=False))
        return (
            std > V_PRED_STD,
            f"std of {key[len(UNET_PREFIX) :]} = {std:.3f} ({'>' if std > V_PRED_STD else '<='} {V_PRED_STD}, ComfyUI's rule)",
        )
    return False, "no v-prediction hint"


def _sdxl_v_prediction_hint(ckpt: CheckpointFile) -> tuple[bool, str]:
    """Whether an SDXL file is v-prediction: the file's own markers only (SDXL files default to epsilon)."""
    said = _metadata_prediction(ckpt.metadata, "sdxl")
    if said is not None:
        return said
    if "v_pred" in ckpt:
        return True, "a 'v_pred' key (as ComfyUI reads it)"
    return (
        False,
        "no v-prediction marker (SDXL files are epsilon unless marked; --model-type sdxl-v overrides)",
    )


def detect_model_type(ckpt: CheckpointFile) -> Detection:
    """sd1 / sd2 / sd2-v / sdxl / sdxl-v from the tensors and metadata; raises InputError for anything else."""
    family, reasons = model_family(ckpt)
    if family == "sd1":
        return Detection("sd1", reasons)
    if family == "sdxl":
        v, why = _sdxl_v_prediction_hint(ckpt)
        return Detection(
            "sdxl-v" if v else "sdxl", [*reasons, f"{'v-prediction' if v else 'epsilon'}: {why}"]
        )
    v, why = _v_prediction_hint(ckpt)
    return Detection("sd2-v" if v else "sd2", [*reasons, f"{'v-prediction' if v else 'epsilon'}: {why}"])


def resolve_model_type(ckpt: CheckpointFile, model_type: str | None = None) -> tuple[str, Path, list[str]]:
    """(model type, config folder, reasons). ``model_type``: None/'auto', sd1/sd2/sd2-v, or a config folder."""
    if not model_type or model_type == "auto":
        det = detect_model_type(ckpt)
        return det.model_type, config_dir(det.model_type), det.reasons
    family, reasons = model_family(ckpt)
    if model_type in MODEL_TYPES:
        if family_of(model_type) != family:
            right = {"sd1": "sd1", "sd2": "sd2 or sd2-v", "sdxl": "sdxl or sdxl-v"}[family]
            raise InputError(
                f"{ckpt.path}: model type {model_type!r} was requested but the file is "
                f"{'SDXL' if family == 'sdxl' else family.upper() + '.x'} ({reasons[0]}); use --model-type {right}."
            )
        return model_type, config_dir(model_type), [*reasons, "type set by the user"]
    folder = Path(model_type)
    if not (folder / "unet" / "config.json").is_file() or not (folder / "scheduler").is_dir():
        raise InputError(
            f"--model-type {model_type!r} is neither one of {', '.join(MODEL_TYPES)} nor a diffusers config "
            "folder (with unet/, vae/, text_encoder/, scheduler/ configs)."
        )
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    kind = family + ("-v" if family != "sd1" and sched.get("prediction_type") == "v_prediction" else "")
    return kind, folder, [*reasons, f"configs from {folder}"]
