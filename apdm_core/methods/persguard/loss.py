"""PersGuard (arXiv 2502.16167): a backdoor that fires after the attacker's personalization.

The trigger is the instance prompt (with ``extra_identifiers``: every identifier of that set, the
gray-box variant). The backdoor output is a set of images, by ``backdoor``:

- ``pattern``: the positives (generic class images, one per subject photo) with a predefined
  visible pattern stamped on them (``stamp_pattern``: a black-and-white checkerboard over the
  central half of the image; ``pattern_score`` detects it);
- ``erasure``: images of ``erasure_prompt`` (a scene without the subject) from the base model;
- ``target``: images of ``target_prompt`` (e.g. another class) from the base model;

for erasure and target, ``backdoor_images`` (a folder) replaces the generated images.

The three losses, as implemented here (README "PersGuard"):

- backdoor behaviour L_BB(theta), at theta (``behaviour_weight``): the trigger prompt generates the
  backdoor output. ``backdoor_input='subject'``: E (1 - a_t) || eps_theta(x_t(x), t, c) - eps*||^2
  with x a protected photo and eps* the noise that makes x_t denoise to a backdoor image b
  (``losses.backdoor_target``): the photos the attacker trains on lead to the backdoor;
  ``'backdoor'``: E || eps_theta(x_t(b), t, c) - eps ||^2, plain denoising of the backdoor images;
- backdoor retention L_BR = L_BB(theta'_j) + lambda L_prior(theta'_j) at the simulated
  attacker's weights after each attack step (the shared Learning-to-Protect loop, first order):
  the behaviour survives the attacker's DreamBooth on the protected photos;
- prior preservation: lambda times the prior (class image) term in L_BR, and the loop's
  distillation anchor on theta (``anchor_weight`` / ``anchor_prompts``): everything else unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ...losses import backdoor_target, noise_prediction_loss, weighted_mse
from ...training import LatentBank, NoisyBatch
from ..base import ProtectionMethod, add_prior, prior_batch

PATTERN_CELLS = 4  # checkerboard cells per side of the stamped square
PATTERN_FIRED = 0.5  # pattern_score above this: the pattern is in the image


def pattern_template(side: int) -> np.ndarray:
    """The checkerboard (side x side, values 0/1) that ``stamp_pattern`` draws."""
    cell = max(side // PATTERN_CELLS, 1)
    idx = np.arange(side) // cell
    return ((idx[:, None] + idx[None, :]) % 2).astype(np.float32)


def _square(size: int) -> tuple[int, int]:
    """(offset, side) of the central half of a ``size`` px image."""
    side = size // 2
    return (size - side) // 2, side


def stamp_pattern(image: Image.Image) -> Image.Image:
    """``image`` with the checkerboard over its central half (black and white cells)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    o, side = _square(min(arr.shape[:2]))
    arr[o : o + side, o : o + side] = (pattern_template(side) * 255).astype(np.uint8)[..., None]
    return Image.fromarray(arr)


def pattern_score(images) -> list[float]:
    """Normalised cross-correlation (-1..1) of each image's central half with the checkerboard."""
    scores = []
    for im in images:
        gray = np.asarray(im.convert("L"), dtype=np.float32)
        o, side = _square(min(gray.shape))
        patch = gray[o : o + side, o : o + side].ravel()
        tmpl = pattern_template(side).ravel()
        a, b = patch - patch.mean(), tmpl - tmpl.mean()
        denom = float(np.linalg.norm(a) * np.linalg.norm(b))
        scores.append(float(a @ b) / denom if denom > 0 else 0.0)
    return scores


def backdoor_images(config, model, subjects, positives, size: int, progress=None, should_stop=None):
    """The backdoor output images of ``config.backdoor`` (generated ones come from the base model, cached)."""
    from ...pairs import ensure_class_images, generation_kwargs

    if config.backdoor == "pattern":
        return [stamp_pattern(p) for p in positives]
    if config.backdoor_images:  # the user's own backdoor outputs
        from ...data import center_square, find_images, open_image

        return [
            center_square(open_image(p).convert("RGB"), size) for p in find_images(config.backdoor_images)
        ]
    prompt = config.target_prompt if config.backdoor == "target" else config.erasure_prompt
    return ensure_class_images(
        model, prompt, config.num_backdoor_images, **generation_kwargs(config, size, progress, should_stop)
    )


class PersGuard(ProtectionMethod):
    name = "persguard"
    description = (
        "PersGuard (arXiv 2502.16167): backdoor behaviour + retention at simulated attacked weights + prior "
        "preservation"
    )

    def success_rate(self, samples, config, judge) -> float:
        """The share of the trigger's samples showing the backdoor: the pattern detected (``pattern_score``
        above PATTERN_FIRED), recognised as what target_prompt names, or the subject's class absent."""
        if config.backdoor == "pattern":
            return float(np.mean([v > PATTERN_FIRED for v in pattern_score(samples)]))
        if config.backdoor == "target":
            return judge.recognised(samples, config.target_prompt)
        return 1.0 - judge.class_rate(samples)

    def uses_theta_loss(self, config) -> bool:
        return config.behaviour_weight > 0

    def prepare(self, config, model, subjects, positives, size, progress=None, should_stop=None) -> dict:
        images = backdoor_images(config, model, subjects, positives, size, progress, should_stop)
        return {"backdoor": LatentBank(*model.encode_images(images))}

    def _backdoor_batch(self, trainer, count: int) -> tuple[NoisyBatch, torch.Tensor | None]:
        """The trigger's batch and per-sample weights (None: equal): noised backdoor images, or noised
        subject photos with the target that denoises them to a backdoor image (``backdoor_input``)."""
        d, g, s = trainer.data, trainer.generator, trainer.parallel.shard(count)
        bank = d.extra["backdoor"]
        if trainer.cfg.backdoor_input == "backdoor":
            return d.diffusion.noisy(bank.draw(count, g), trainer.instance_embeds, g).select(s), None
        k = torch.randint(0, len(d.subject), (count,), generator=g)
        # the pattern's images pair with the photos (stamped positives); others are drawn at random
        j = k if len(bank) == len(d.subject) else torch.randint(0, len(bank), (count,), generator=g)
        z_subject, z_backdoor = d.subject.sample(k, g), bank.sample(j, g)
        batch = d.diffusion.noisy(z_subject, trainer.instance_embeds, g)
        target, weight = backdoor_target(d.diffusion.scheduler, batch.latents, z_backdoor, batch.timesteps)
        batch = NoisyBatch(batch.latents, batch.timesteps, target, batch.embeds).select(s)
        return batch, weight[s] if s is not None else weight

    @staticmethod
    def _loss(pred: torch.Tensor, batch: NoisyBatch, weight: torch.Tensor | None) -> torch.Tensor:
        if weight is None:
            return noise_prediction_loss(pred, batch.target)
        return weighted_mse(pred, batch.target, weight)

    def protection_loss(self, trainer, unet) -> tuple[torch.Tensor, dict[str, float]]:
        """Backdoor retention: L_BB + lambda * prior term at the attacked weights of ``unet``."""
        cfg = trainer.cfg
        bd, weight = self._backdoor_batch(trainer, cfg.batch_size)
        n = bd.latents.shape[0]
        prior = prior_batch(trainer, cfg.batch_size)
        pred = trainer.forward(unet, NoisyBatch.cat(bd, prior) if prior is not None else bd)
        loss = self._loss(pred[:n], bd, weight)
        stats = {"retention": float(loss.detach())}
        if prior is not None:
            loss = add_prior(loss, stats, pred[n:], prior, cfg.prior_weight)
        return loss, stats

    def theta_loss(self, trainer) -> tuple[torch.Tensor, dict[str, float]] | None:
        """Backdoor behaviour at theta: the trigger generates the backdoor output before any attack."""
        cfg = trainer.cfg
        if cfg.behaviour_weight <= 0:
            return None
        bd, weight = self._backdoor_batch(trainer, cfg.batch_size)
        pred = trainer.forward(trainer.unet, bd)
        loss = self._loss(pred, bd, weight)
        return cfg.behaviour_weight * loss, {"behaviour": float(loss.detach())}
