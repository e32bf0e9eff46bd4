"""Load Stable Diffusion components and hand them around as one ``SDModel``.

This issue's scope is diffusers folders; single-file checkpoints plug into ``load_model``
through ``apdm_core.checkpoint`` when present. Every host (ComfyUI, A1111, CLI) goes through
``load_model`` so a real SD checkpoint and the tiny demo model take exactly the same path.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .errors import InputError

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(
            f"device={device!r} is not a torch device; use 'auto', 'cpu', 'cuda' or 'cuda:N'."
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={device!r} but this torch has no CUDA; use device='cpu'.")
    return dev


@dataclass
class SDModel:
    """The components of a Stable Diffusion model plus where they came from."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any  # the model's own sampling scheduler; training uses noise_scheduler()
    source: str = ""  # the file or folder it was loaded from ("" = built in memory)
    kind: str = "diffusers"  # sd1 / sd2 / sd2-v / sdxl / sdxl-v / diffusers / tiny
    info: dict[str, Any] = field(default_factory=dict)
    _fingerprint: str | None = field(default=None, repr=False)
    text_encoder_2: Any = None  # SDXL's second text encoder (OpenCLIP bigG, with projection)
    tokenizer_2: Any = None

    # --- facts about the model ------------------------------------------------------------
    @property
    def is_xl(self) -> bool:
        """SDXL: two text encoders, a pooled embedding and size/crop ids (``apdm_core.sdxl``)."""
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> tuple:
        return (self.text_encoder,) + ((self.text_encoder_2,) if self.is_xl else ())

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def noise_scheduler(self):
        """The DDPM training scheduler with this model's betas and prediction type."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler.config)

    def to(self, device: torch.device | str) -> SDModel:
        for m in (self.unet, self.vae, *self.text_encoders):
            m.to(device)
        return self

    def fingerprint(self) -> str:
        """sha256 over the UNet's tensors (names, dtypes, bytes): identifies the base model for caches."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, t in sorted(self.unet.state_dict().items()):
                h.update(name.encode())
                h.update(str(t.dtype).encode())
                h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # --- using it ---------------------------------------------------------------------------
    def pipeline(self, unet=None, scheduler=None):
        """A StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) over these components (no safety
        checker or watermarker, nothing downloaded)."""
        if self.is_xl:
            from diffusers import StableDiffusionXLPipeline

            pipe = StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=unet if unet is not None else self.unet,
                scheduler=scheduler if scheduler is not None else self.scheduler,
                add_watermarker=False,
            )
            pipe.set_progress_bar_config(disable=True)
            return pipe
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=unet if unet is not None else self.unet,
            scheduler=scheduler if scheduler is not None else self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], size: int | None = None) -> torch.Tensor:
        """Text embeddings exactly as the diffusers pipeline computes them for sampling; for SDXL the
        token states of both encoders with the pooled embedding and the size/crop ids of the training
        resolution ``size`` (default: native) packed after them (``apdm_core.sdxl.encode``)."""
        pipe = self.pipeline()
        if self.is_xl:
            from .sdxl import encode

            return encode(pipe, prompts, size or self.native_resolution, self.device).detach()
        embeds, _ = pipe.encode_prompt(list(prompts), self.device, 1, False)
        return embeds.detach()

    @torch.no_grad()
    def encode_images(
        self, images: list[Image.Image], batch_size: int = 8
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled VAE latent distributions (mean, std) of PIL images, for sampling latents later."""
        means, stds = [], []
        dtype = next(self.vae.parameters()).dtype
        for i in range(0, len(images), batch_size):
            mean, std = self.latent_distribution(
                pil_to_tensor(images[i : i + batch_size]).to(self.device, dtype)
            )
            means.append(mean.float())
            stds.append(std.float())
        return torch.cat(means), torch.cat(stds)

    def latent_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled VAE latent distribution (mean, std) of pixels ``x`` in [-1, 1]; differentiable (the
        image-level protections take gradients through it)."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        dist = vae.encode(x).latent_dist
        return (dist.mean - shift) * vae.config.scaling_factor, dist.std * vae.config.scaling_factor


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> float tensor (N, 3, H, W) in [-1, 1] (diffusers' VaeImageProcessor steps)."""
    from diffusers.image_processor import VaeImageProcessor as P

    return P.normalize(P.numpy_to_pt(P.pil_to_numpy([im.convert("RGB") for im in images])))


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """Float tensor (N, 3, H, W) in [-1, 1] -> PIL images (diffusers' VaeImageProcessor steps)."""
    from diffusers.image_processor import VaeImageProcessor as P

    return P.numpy_to_pil(P.pt_to_numpy(P.denormalize(x.detach().float().cpu())))


def _load_scheduler(folder: Path):
    import diffusers

    cfg_path = folder / "scheduler" / "scheduler_config.json"
    if not cfg_path.exists():
        raise InputError(
            f"{folder}: no scheduler/scheduler_config.json; is this a complete diffusers model folder?"
        )
    import json

    cls_name = json.loads(cfg_path.read_text()).get("_class_name", "PNDMScheduler")
    cls = getattr(diffusers, cls_name, None) or diffusers.PNDMScheduler
    return cls.from_pretrained(folder, subfolder="scheduler", local_files_only=True)


def load_diffusers_folder(folder: str | Path, dtype: torch.dtype = torch.float32) -> SDModel:
    """Load a diffusers-format SD model folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    xl = (folder / "text_encoder_2").is_dir() or (folder / "tokenizer_2").is_dir()
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") + (
        ("text_encoder_2", "tokenizer_2") if xl else ()
    )
    missing = [s for s in parts if not (folder / s).is_dir()]
    if missing:
        raise InputError(
            f"{folder} is not a diffusers Stable Diffusion folder (missing {', '.join(missing)}/). "
            "Pass a folder saved by diffusers (save_pretrained) or a single-file .safetensors checkpoint."
        )
    kw = {"local_files_only": True}
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **kw)
        text_encoder = CLIPTextModel.from_pretrained(
            folder, subfolder="text_encoder", torch_dtype=dtype, **kw
        )
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kw)
        xl_parts = {}
        if xl:
            from transformers import CLIPTextModelWithProjection

            xl_parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", torch_dtype=dtype, **kw
            )
            xl_parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", **kw)
    except (OSError, ValueError) as exc:
        raise InputError(f"Could not load the diffusers model in {folder}: {exc}") from exc
    scheduler = _load_scheduler(folder)
    kind = "tiny" if (folder / "apdm_tiny.json").exists() else "diffusers"
    return SDModel(unet, vae, text_encoder, tokenizer, scheduler, source=str(folder), kind=kind, **xl_parts)


def save_diffusers(
    model: SDModel,
    out_dir: str | Path,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    inputs: tuple[Path, ...] = (),
) -> Path:
    """Write the model as a diffusers folder, atomically (temp folder + rename); never over, in or
    around the source or another of the ``inputs``."""
    from .fileio import atomic_path

    out_dir = Path(out_dir)
    protected = ((Path(model.source),) if model.source else ()) + tuple(map(Path, inputs))
    with atomic_path(out_dir, overwrite=overwrite, protected=protected) as tmp:
        model.pipeline().save_pretrained(tmp, safe_serialization=True)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out_dir
