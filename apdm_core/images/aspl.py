"""ASPL (Anti-DreamBooth, Van Le et al. 2023): alternating surrogate DreamBooth and pixel PGD.

Per round: a copy f' of the surrogate f learns the clean photos (``surrogate_steps`` DreamBooth
steps), the pixels take ``pgd_steps`` signed-gradient steps that increase f''s denoising loss
under the instance prompt (projected into the L-infinity budget), then f learns the protected
photos (``surrogate_steps`` steps): the surrogate follows the attacker who trains on them.
Each DreamBooth phase gets a fresh AdamW, as the authors' code does.
"""

from __future__ import annotations

import copy

import torch

from ..losses import noise_prediction_loss
from ..training import dreambooth_loss
from .base import ImageMethod, ImageTask, encode, encode_bank


class ASPL(ImageMethod):
    name = "aspl"

    def __init__(self, task: ImageTask) -> None:
        super().__init__(task)
        self.surrogate = copy.deepcopy(task.model.unet).requires_grad_(True).train()
        self.x = task.originals.clone()

    def _dreambooth(self, unet, pixels: torch.Tensor) -> float:
        t, cfg = self.task, self.task.cfg
        bank = encode_bank(t.model, pixels)
        opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=cfg.lr)
        loss = torch.zeros(())
        for _ in range(cfg.surrogate_steps):
            opt.zero_grad(set_to_none=True)
            loss = dreambooth_loss(
                unet,
                t.forward,
                t.diffusion,
                bank,
                t.instance_embeds,
                t.generator,
                len(bank),
                t.prior,
                t.class_embeds,
                cfg.prior_weight,
            )
            loss.backward()
            opt.step()
        return float(loss.detach())

    def _pgd(self, unet) -> float:
        t, cfg = self.task, self.task.cfg
        unet.requires_grad_(False)
        alpha = 2.0 * cfg.pgd_alpha  # the [-1, 1] scale
        value = 0.0
        for _ in range(cfg.pgd_steps):
            x = self.x.detach().requires_grad_(True)
            batch = t.diffusion.noisy(encode(t.model, x), t.instance_embeds, t.generator)
            loss = noise_prediction_loss(t.forward(unet, batch), batch.target)
            (grad,) = torch.autograd.grad(loss, x)
            self.x = t.project(x.detach() + alpha * grad.sign())
            value = float(loss.detach())
        return value

    def step(self) -> dict[str, float]:
        sur = copy.deepcopy(self.surrogate)
        clean = self._dreambooth(sur, self.task.originals)
        adv = self._pgd(sur)
        del sur
        per = self._dreambooth(self.surrogate, self.x)
        self.step_count += 1
        entry = {
            "step": self.step_count,
            "surrogate_clean": clean,
            "pgd_loss": adv,
            "surrogate_protected": per,
        }
        self.history.append(entry)
        return entry

    def current(self) -> torch.Tensor:
        return self.x.detach()

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "x": self.x.detach().cpu(),
            "surrogate": {k: v.detach().cpu() for k, v in self.surrogate.state_dict().items()},
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.x = state["x"].to(self.task.originals.device)
        self.surrogate.load_state_dict(state["surrogate"])
