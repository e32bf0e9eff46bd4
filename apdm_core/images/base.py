"""What the image-level methods share: the task (photos, prompts, surrogate), differentiable VAE
passes, DDIM inversion/denoising, and the method interface."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..training import Diffusion, LatentBank, NoisyBatch


@dataclass
class ImageTask:
    """One run's inputs on the compute device. Pixels are in [-1, 1] (the VAE's range)."""

    cfg: object  # ImageProtectConfig
    model: object  # SDModel (the surrogate / frozen personalization model)
    originals: torch.Tensor  # (N, 3, H, W) the photos
    instance_embeds: torch.Tensor  # (1, L, D)
    class_embeds: torch.Tensor  # (1, L, D)
    diffusion: Diffusion
    prior: LatentBank | None  # class images (ASPL's surrogate prior preservation)
    generator: torch.Generator
    forward: object  # forward(unet, NoisyBatch) -> prediction

    @property
    def eps(self) -> float:
        """The budget on the [-1, 1] scale (the 8-bit levels the output may move, times 2/255)."""
        return 2.0 * self.cfg.budget_levels / 255.0

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` moved into the budget box around the photos and the valid pixel range."""
        return (self.originals + (x - self.originals).clamp(-self.eps, self.eps)).clamp(-1, 1)


def encode(model, x: torch.Tensor) -> torch.Tensor:
    """Scaled VAE latents (the distribution's mean) of pixels in [-1, 1], differentiable."""
    return model.latent_distribution(x)[0]


def encode_bank(model, x: torch.Tensor) -> LatentBank:
    """A LatentBank (mean, std) of pixels ``x`` (no gradient), for DreamBooth steps on them."""
    with torch.no_grad():
        mean, std = model.latent_distribution(x)
    return LatentBank(mean.float(), std.float())


def decode(model, z: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] of scaled latents, differentiable."""
    vae = model.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode(z / vae.config.scaling_factor + shift).sample.clamp(-1, 1)


def ddim_grid(scheduler, steps: int) -> list[int]:
    """0 and ``steps`` evenly spaced timesteps up to the last one (e.g. 0, 249, 499, 749, 999)."""
    n = scheduler.config.num_train_timesteps
    return [0] + [int((i + 1) * n / steps) - 1 for i in range(steps)]


def _eps_and_x0(task: ImageTask, unet, z: torch.Tensor, t: int, embeds: torch.Tensor):
    a = task.diffusion.scheduler.alphas_cumprod.to(z.device)[t].float()
    ts = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
    out = task.forward(unet, NoisyBatch(z, ts, z, embeds.expand(z.shape[0], -1, -1))).float()
    if task.diffusion.scheduler.config.prediction_type == "v_prediction":
        eps = a.sqrt() * out + (1 - a).sqrt() * z
    else:
        eps = out
    return eps, (z - (1 - a).sqrt() * eps) / a.sqrt()


def ddim_move(task: ImageTask, unet, z: torch.Tensor, grid: list[int], embeds: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM from timestep grid[0] to grid[-1] (up: inversion, down: denoising)."""
    alphas = task.diffusion.scheduler.alphas_cumprod.to(z.device)
    for s, t in zip(grid[:-1], grid[1:]):
        eps, x0 = _eps_and_x0(task, unet, z, s, embeds)
        a_t = alphas[t].float()
        z = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
    return z


class ImageMethod:
    """An image-level protection: ``step()`` is one outer iteration, ``current()`` the protected pixels."""

    name = ""

    def __init__(self, task: ImageTask) -> None:
        self.task = task
        self.step_count = 0
        self.history: list[dict] = []

    def step(self) -> dict[str, float]:
        raise NotImplementedError

    def current(self) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"step": self.step_count, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.history = int(state["step"]), list(state["history"])
