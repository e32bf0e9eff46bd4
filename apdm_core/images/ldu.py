"""LDU (Latent Diffusion Unlearning, Devulapally et al., ACM MM 2025): a trajectory-shifted perturbation.

Each photo is inverted (deterministic DDIM, ``denoise_steps`` steps, class prompt) to its terminal
latent z_T; a learned shift d of z_T is decoded by the same few-step DDIM denoising and the VAE
decoder into x(d) (few steps let the shift survive into the image). d maximises the frozen
model's personalization (denoising) loss of the delivered image under the instance prompt, with
a Lagrange multiplier on the budget violation mean(relu(|x(d) - x| - budget)) updated by dual
ascent (the imperceptibility budget). The delivered image is x + clip(x(d) - x, budget): the
L-infinity budget holds exactly. The paper trains a small network rho(z_T) for the shift; here
the shift of each photo is optimised directly (the same objective, no generalisation to new photos).
"""

from __future__ import annotations

import torch

from ..losses import noise_prediction_loss
from .base import ImageMethod, ImageTask, ddim_grid, ddim_move, decode, encode


class LDU(ImageMethod):
    name = "ldu"

    def __init__(self, task: ImageTask) -> None:
        super().__init__(task)
        unet = task.model.unet
        unet.requires_grad_(False)
        self.grid = ddim_grid(task.diffusion.scheduler, task.cfg.denoise_steps)
        with torch.no_grad():
            self.z_T = ddim_move(task, unet, encode(task.model, task.originals), self.grid, task.class_embeds)
        self.shift = torch.zeros_like(self.z_T, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.shift], lr=task.cfg.latent_lr)
        self.lam = 1.0

    def reconstruct(self) -> torch.Tensor:
        t = self.task
        z = ddim_move(t, t.model.unet, self.z_T + self.shift, self.grid[::-1], t.class_embeds)
        return decode(t.model, z)

    def step(self) -> dict[str, float]:
        t = self.task
        x_rec = self.reconstruct()
        violation = (torch.relu((x_rec - t.originals).abs() - t.eps)).mean()
        delivered = t.project(x_rec)
        batch = t.diffusion.noisy(encode(t.model, delivered), t.instance_embeds, t.generator)
        per = noise_prediction_loss(t.forward(t.model.unet, batch), batch.target)
        loss = -per + self.lam * violation
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.lam = max(0.0, self.lam + t.cfg.dual_lr * float(violation.detach()))
        self.step_count += 1
        entry = {
            "step": self.step_count,
            "personalization_loss": float(per.detach()),
            "violation": float(violation.detach()),
            "lambda": self.lam,
        }
        self.history.append(entry)
        return entry

    def current(self) -> torch.Tensor:
        with torch.no_grad():
            return self.task.project(self.reconstruct())

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "shift": self.shift.detach().cpu(),
            "lambda": self.lam,
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.shift.copy_(state["shift"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lam = float(state["lambda"])
