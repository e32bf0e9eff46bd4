"""Pretrain the demo world's tiny text-to-image model: the VAE first, then the UNet + text encoder.

The result is an ordinary diffusers Stable Diffusion folder (unet/, vae/, text_encoder/,
tokenizer/, scheduler/) that ``apdm_core.loading.load_model`` loads exactly as it loads a
real SD checkpoint, plus ``apdm_world.json`` (the settings, losses and timings of the run)
and ``MODEL_CARD.md``.

Recipe (``apdm world pretrain``):

1. Render the pretraining set: ``subjects`` random individuals of every class (their own seed
   namespace, so no public subject ``make_subject(seed)`` is among them), ``photos`` photos
   each, every photo with a random caption (bare class prompt, or colour and/or pattern named).
2. Train the VAE (AutoencoderKL; 4x downsampling: 32 px photos, 8x8x4 latents) on the photos:
   MSE + a small KL.
   Its ``scaling_factor`` is set to 1/std of the latents, as SD's 0.18215 was.
3. Encode every photo once (the VAE is frozen from here on) and train the UNet and the CLIP
   text encoder together with the SD objective (epsilon prediction, SD's noise schedule),
   10% empty captions for classifier-free guidance, AdamW with cosine decay, and an EMA of
   the weights (the EMA weights are shipped).

The text encoder is trained, not frozen: SD's frozen CLIP already knows language, a random
one does not, and training the tiny one with the UNet is the cheapest way to give the
embeddings the class and attribute words. From then on it is frozen like SD's: DreamBooth,
the attacks and APDM train the UNet only. The identifier ``sks`` is in the vocabulary but in
no caption, so its embedding stays the untrained one of a rare token.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..fileio import atomic_path
from ..models import SDModel, pil_to_tensor
from ..progress import ProgressCallback, StopCheck, Tracker
from . import render

log = logging.getLogger(__name__)


ARCHS = ("sd", "sdxl")  # PretrainConfig.arch
# Text context of the world model in tokens: the longest world caption has 12, and cross-attention
# over 16 instead of SD's 77 positions makes every UNet step ~1.6x cheaper on a CPU.
CONTEXT = 16


@dataclass
class PretrainConfig:
    """Every setting of ``apdm world pretrain`` (the defaults made the shipped model)."""

    seed: int = 0
    subjects: int = 2000  # individuals in the pretraining set (all classes together)
    photos: int = 5  # photos per individual
    vae_steps: int = 2500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl: float = 1e-4  # weight of the per-element KL term
    vae_crop: int = 0  # train the (fully convolutional) VAE on random crops of this size (0 = whole)
    unet_steps: int = 9000
    unet_batch: int = 16
    unet_lr: float = 1e-3
    text_lr: float = 2e-3
    ema_decay: float = 0.999
    uncond: float = 0.1  # fraction of empty captions (classifier-free guidance)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    vae_from: str = ""  # reuse the VAE of this world model folder instead of training one (stage 2 only)
    arch: str = "sd"  # "sd": SD1-shaped (the shipped world); "sdxl": SDXL-shaped (two text encoders, pooled + size ids)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name not in ("seed", "vae_from", "arch") and (not math.isfinite(float(v)) or v < 0):
                raise InputError(f"PretrainConfig.{f.name} must be >= 0 (got {v}).")
        if self.arch not in ARCHS:
            raise InputError(f"PretrainConfig.arch must be one of {', '.join(ARCHS)} (got {self.arch!r}).")


# ------------------------------------------------------------------------------------------
# the architecture
# ------------------------------------------------------------------------------------------
def world_configs(vocab_size: int, arch: str = "sd") -> dict:
    """Configs of the world model: the tiny SD topology (apdm_core.tiny), 32 px photos, 8x8x4 latents.

    ``arch="sdxl"``: the tiny SDXL topology (``tiny.tiny_xl_configs``: no attention at the first level, two
    transformer layers at the second, two text encoders of 32 and 48 dims, the pooled embedding and the
    size/crop ids in the time embedding) with the same VAE as the SD world (``build_world_model`` gives
    it the SD world's DDIM sampler too), so the two worlds differ in the UNet and its conditioning only."""
    from ..tiny import tiny_configs, tiny_xl_configs

    cfg = tiny_configs(latent_size=render.SIZE // 4, text_dim=32, vocab_size=vocab_size)
    if arch == "sdxl":
        cfg = {**tiny_xl_configs(latent_size=render.SIZE // 4, vocab_size=vocab_size), "vae": cfg["vae"]}
    cfg["vae"].update(
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 32],
        sample_size=render.SIZE,
    )
    return cfg


def build_world_model(seed: int = 0, arch: str = "sd") -> SDModel:
    """The randomly initialised world model with the world's vocabulary (before pretraining)."""
    from diffusers import DDIMScheduler

    from ..tiny import build_tiny_model, build_tiny_xl_model, write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab = json.loads((write_clip_tokenizer(tmp, render.VOCABULARY) / "vocab.json").read_text())
    configs = world_configs(len(vocab), arch)
    build = build_tiny_xl_model if arch == "sdxl" else build_tiny_model
    model = build(seed=seed, words=render.VOCABULARY, configs=configs)
    if arch == "sdxl":  # the SD world's sampler (tiny_xl_model builds SDXL's Euler)
        model.scheduler = DDIMScheduler(**world_configs(len(vocab))["scheduler"])
    for tok in (model.tokenizer, model.tokenizer_2):
        if tok is not None:
            tok.model_max_length = CONTEXT
    return model


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
@dataclass
class WorldDataset:
    images: np.ndarray  # (N, H, W, 3) uint8
    owner: np.ndarray  # (N,) index into subjects
    subjects: list[render.Subject]


def render_dataset(
    namespace: str,
    n_subjects: int,
    photos: int,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> WorldDataset:
    """``n_subjects`` individuals of ``namespace`` (classes in turn), ``photos`` photos each."""
    offset = seed * 1_000_003
    subjects = [
        render.make_subject(offset + i, namespace, cls=render.CLASSES[i % len(render.CLASSES)])
        for i in range(n_subjects)
    ]
    images = np.empty((n_subjects * photos, render.SIZE, render.SIZE, 3), np.uint8)
    tracker = Tracker("render", n_subjects, progress, should_stop)
    for i, s in enumerate(subjects):
        for j, im in enumerate(render.photos(s, photos)):
            images[i * photos + j] = np.asarray(im)
        if (i + 1) % 50 == 0 or i + 1 == n_subjects:
            tracker.update((i + 1) - tracker.step)
    return WorldDataset(images, np.repeat(np.arange(n_subjects), photos), subjects)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------
# stage 1: the VAE
# ------------------------------------------------------------------------------------------
def train_vae(vae, data: WorldDataset, cfg: PretrainConfig, progress=None, should_stop=None) -> list[dict]:
    """Train the AutoencoderKL on the photos: MSE + vae_kl * KL (per element). Returns the log."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = _cosine(opt, cfg.vae_steps)
    tracker = Tracker("vae", cfg.vae_steps, progress, should_stop)
    history, window = [], []
    for step in range(cfg.vae_steps):
        idx = torch.randint(0, len(data.images), (cfg.vae_batch,), generator=g)
        x = to_tensor(data.images[idx.numpy()])
        if 0 < cfg.vae_crop < x.shape[-1]:
            top, left = torch.randint(0, (x.shape[-1] - cfg.vae_crop) // 8 + 1, (2,), generator=g) * 8
            x = x[..., top : top + cfg.vae_crop, left : left + cfg.vae_crop]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).mean()
        loss = mse + cfg.vae_kl * kl
        _check(loss, "vae", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window.append((float(mse.detach()), float(kl.detach())))
        if (step + 1) % 50 == 0 or step + 1 == cfg.vae_steps:
            m, k = np.mean(window, axis=0)
            history.append({"step": step + 1, "mse": float(m), "kl": float(k)})
            window = []
        tracker.update(losses={"mse": float(mse.detach()), "kl": float(kl.detach())})
    vae.eval().requires_grad_(False)
    return history


@torch.no_grad()
def encode_dataset(vae, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled latent distributions (mean, std) of all photos."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(to_tensor(images[i : i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


# ------------------------------------------------------------------------------------------
# stage 2: UNet + text encoder
# ------------------------------------------------------------------------------------------
def train_unet(
    model: SDModel,
    data: WorldDataset,
    mean: torch.Tensor,
    std: torch.Tensor,
    cfg: PretrainConfig,
    progress=None,
    should_stop=None,
) -> list[dict]:
    """Train the UNet and the text encoder(s) on scaled latents with random captions (EMA shipped)."""
    from diffusers.training_utils import EMAModel

    from ..losses import noise_prediction_loss
    from ..training import Diffusion, LatentBank, make_forward

    g = torch.Generator().manual_seed(cfg.seed + 2)
    rng = np.random.default_rng(cfg.seed + 3)
    bank = LatentBank(mean, std)
    diffusion = Diffusion(model.noise_scheduler())
    forward = make_forward(torch.device("cpu"))
    unet, encoders = model.unet, model.text_encoders
    unet.train().requires_grad_(True)
    text_params = [p for te in encoders for p in te.train().requires_grad_(True).parameters()]
    params = list(unet.parameters()) + text_params
    opt = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": cfg.unet_lr, "weight_decay": 1e-2},
            {"params": text_params, "lr": cfg.text_lr, "weight_decay": 0.0},
        ]
    )
    pipe = model.pipeline() if model.is_xl else None
    if pipe is not None:  # it warns at every caption cut at CONTEXT tokens (the SD world cuts them silently)
        logging.getLogger(type(pipe).__module__).setLevel(logging.ERROR)
    sched = _cosine(opt, cfg.unet_steps)
    ema = EMAModel(params, decay=cfg.ema_decay)
    token_cache: dict[str, torch.Tensor] = {}
    tracker = Tracker("unet", cfg.unet_steps, progress, should_stop)
    history, window = [], []
    for step in range(cfg.unet_steps):
        idx = torch.randint(0, len(bank), (cfg.unet_batch,), generator=g)
        captions = [
            "" if rng.random() < cfg.uncond else render.caption(data.subjects[data.owner[i]], rng)
            for i in idx.tolist()
        ]
        if pipe is not None:  # SDXL: both encoders' token states + the pooled embedding + size ids
            from ..sdxl import encode

            embeds = encode(pipe, captions, render.SIZE, "cpu")
        else:
            embeds = model.text_encoder(
                torch.stack([_tokens(model.tokenizer, c, token_cache) for c in captions])
            )[0]
        batch = diffusion.noisy(bank.sample(idx, g), embeds, g)
        loss = noise_prediction_loss(forward(unet, batch), batch.target)
        _check(loss, "unet", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        window.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == cfg.unet_steps:
            history.append({"step": step + 1, "loss": float(np.mean(window))})
            window = []
        tracker.update(losses={"loss": float(loss.detach())})
    ema.copy_to(params)
    for m in (unet, *encoders):
        m.eval().requires_grad_(False)
    return history


def _tokens(tokenizer, text: str, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    if text not in cache:
        cache[text] = tokenizer(
            text,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]
    return cache[text]


def _cosine(opt, steps: int):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, min(100, steps // 10), max(steps, 1))


def _check(loss: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(loss):
        from ..errors import TrainingDiverged

        raise TrainingDiverged(
            f"{what} pretraining loss became {float(loss)} at step {step + 1}; lower its lr."
        )


# ------------------------------------------------------------------------------------------
# the whole recipe
# ------------------------------------------------------------------------------------------
def pretrain(
    out: str | Path,
    cfg: PretrainConfig | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    overwrite: bool = False,
) -> Path:
    """Run the recipe and write the world model folder ``out`` (atomically)."""
    from ..fileio import check_target

    cfg = cfg or PretrainConfig()
    out = Path(out)
    check_target(out, overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    clock = _Clock()
    model = build_world_model(cfg.seed, cfg.arch)
    data = render_dataset("pretrain", cfg.subjects, cfg.photos, cfg.seed, progress, should_stop)
    clock.lap("render")
    if cfg.vae_from:
        from diffusers import AutoencoderKL

        model.vae = AutoencoderKL.from_pretrained(cfg.vae_from, subfolder="vae", local_files_only=True)
        model.vae.eval().requires_grad_(False)
        source = json.loads((Path(cfg.vae_from) / "apdm_world.json").read_text())
        vae_log = source["vae"]["log"]
    else:
        vae_log = train_vae(model.vae, data, cfg, progress, should_stop)
    clock.lap("vae")
    if cfg.vae_from:  # the cost of the reused stage is the source run's
        clock.laps["vae"] = {**source["timing"]["vae"], "reused_from": Path(cfg.vae_from).name}
    mean, std = encode_dataset(model.vae, data.images)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(cfg.seed))
    scale = float(1.0 / z.std())
    model.vae.register_to_config(scaling_factor=scale)
    clock.lap("encode")
    unet_log = train_unet(model, data, mean * scale, std * scale, cfg, progress, should_stop)
    clock.lap("unet")
    record = {
        "config": asdict(cfg),
        "vae": {"scaling_factor": scale, "latent_mean": float(z.mean()), "log": vae_log},
        "unet": {"log": unet_log},
        "images": int(len(data.images)),
        "timing": clock.laps,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    return save_world_model(model, out, record, overwrite=overwrite)


class _Clock:
    """Wall and CPU seconds per stage."""

    def __init__(self) -> None:
        self.laps: dict[str, dict[str, float]] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.laps[name] = {"wall_s": round(wall - self._wall, 1), "cpu_s": round(cpu - self._cpu, 1)}
        self._wall, self._cpu = wall, cpu
        log.info("%s: %s", name, self.laps[name])


def save_world_model(model: SDModel, out: Path, record: dict, overwrite: bool = False) -> Path:
    """Write the diffusers folder, the tokenizer files, apdm_world.json and MODEL_CARD.md."""
    from ..tiny import write_clip_tokenizer
    from .card import model_card

    with atomic_path(out, overwrite=overwrite) as tmp:
        model.pipeline().save_pretrained(tmp, safe_serialization=True)
        for sub in ("tokenizer", "tokenizer_2") if model.is_xl else ("tokenizer",):
            write_clip_tokenizer(tmp / sub, render.VOCABULARY, max_length=CONTEXT)
        (tmp / "apdm_tiny.json").write_text(
            json.dumps({"note": "the APDM demo world model; see MODEL_CARD.md"}), encoding="utf-8"
        )
        (tmp / "apdm_world.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        (tmp / "MODEL_CARD.md").write_text(model_card(record, asdict(PretrainConfig())), encoding="utf-8")
    return out


def vae_reconstruct(vae, images: list) -> list:
    """Encode (mean) and decode PIL images: what the VAE keeps of them."""
    from ..models import tensor_to_pil

    with torch.no_grad():
        x = pil_to_tensor(images)
        return tensor_to_pil(vae.decode(vae.encode(x).latent_dist.mean).sample)
