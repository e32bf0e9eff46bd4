"""Building blocks shared by every training loop (protection, the simulated attacker, real attacks).

- ``LatentBank``: cached VAE latent distributions of fixed images, re-sampled every draw.
- ``Diffusion``: forward diffusion with the model's training scheduler and the right target.
- ``dreambooth_loss``: the DreamBooth objective (instance term + lambda * prior term in one
  forward), used by L2P's simulated attacker and by ``apdm_core.attack``.

All randomness is drawn from an explicit CPU ``torch.Generator`` (reproducible and resumable,
identical on CPU and GPU), then moved to the tensors' device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError
from .fileio import atomic_path
from .interrupts import uninterrupted  # noqa: F401  (its home; the loops import it from here)
from .losses import noise_prediction_loss, training_target
from .sdxl import unet_call


class LatentBank:
    """VAE latent distributions (mean, std) of fixed images; each draw samples a fresh latent."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        eps = torch.randn(self.mean[idx].shape, generator=generator).to(self.mean.device)
        return self.mean[idx] + self.std[idx] * eps

    def draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``batch_size`` latents of uniformly chosen images."""
        return self.sample(torch.randint(0, len(self), (batch_size,), generator=generator), generator)


@dataclass
class NoisyBatch:
    latents: torch.Tensor  # x_t
    timesteps: torch.Tensor
    target: torch.Tensor
    embeds: torch.Tensor

    @staticmethod
    def cat(*batches: NoisyBatch) -> NoisyBatch:
        names = ("latents", "timesteps", "target", "embeds")
        return NoisyBatch(*(torch.cat([getattr(b, n) for b in batches]) for n in names))

    def select(self, rows: slice | None) -> NoisyBatch:
        """The samples ``rows`` of the batch (None: all), e.g. one process's share under DDP."""
        if rows is None:
            return self
        return NoisyBatch(self.latents[rows], self.timesteps[rows], self.target[rows], self.embeds[rows])


class Diffusion:
    """Forward diffusion q(x_t | x_0) with a DDPM training scheduler."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def noise_and_timesteps(self, z0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(z0.shape, generator=g).to(z0.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (z0.shape[0],), generator=g)
        return noise, t.to(z0.device)

    def noisy(
        self, z0: torch.Tensor, embeds: torch.Tensor, g: torch.Generator, noise=None, t=None
    ) -> NoisyBatch:
        """Noise clean latents at random timesteps (or the given noise and t) -> x_t, t, target."""
        if noise is None:
            noise, t = self.noise_and_timesteps(z0, g)
        x_t = self.scheduler.add_noise(z0, noise, t)
        target = training_target(self.scheduler, z0, noise, t)
        return NoisyBatch(x_t, t, target, embeds.expand(z0.shape[0], -1, -1))


def autocast_for(device: torch.device, mixed_precision: str = "no"):
    """The autocast context for a precision setting ('no'/'fp32' -> none; 'bf16', 'fp16').

    The cast cache is off: a UNet uses each weight once per forward, so caching saves no cast
    and would keep a half-precision copy of every weight alive for the whole forward (with
    gradient checkpointing, that copy would be the largest activation).
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if dtype is not None:
        return torch.autocast(device.type, dtype=dtype, cache_enabled=False)
    return contextlib.nullcontext()


def make_forward(device: torch.device, mixed_precision: str = "no") -> Callable:
    """forward(unet, batch) -> prediction, under the requested autocast."""

    def forward(unet, batch: NoisyBatch) -> torch.Tensor:
        with autocast_for(device, mixed_precision):
            return unet_call(unet, batch.latents, batch.timesteps, batch.embeds)

    return forward


def dreambooth_loss(
    unet,
    forward: Callable,
    diffusion: Diffusion,
    instance: LatentBank,
    instance_embeds: torch.Tensor,
    generator: torch.Generator,
    batch_size: int = 1,
    prior: LatentBank | None = None,
    class_embeds: torch.Tensor | None = None,
    prior_weight: float = 1.0,
    shard: slice | None = None,
) -> torch.Tensor:
    """DreamBooth loss (paper Eq. 5): L_simple on subject images + lambda * L_ppl on class images.

    Instance and class batches go through the UNet in one forward pass, then split, as in
    diffusers' train_dreambooth.py. ``shard``: the whole batch is drawn (the same random stream
    as without it), then only these samples are used (one process's share under DDP).
    """
    inst = diffusion.noisy(instance.draw(batch_size, generator), instance_embeds, generator).select(shard)
    if prior is None or prior_weight == 0:
        return noise_prediction_loss(forward(unet, inst), inst.target)
    cls = diffusion.noisy(prior.draw(batch_size, generator), class_embeds, generator).select(shard)
    pred_inst, pred_cls = forward(unet, NoisyBatch.cat(inst, cls)).chunk(2)
    return noise_prediction_loss(pred_inst, inst.target) + prior_weight * noise_prediction_loss(
        pred_cls, cls.target
    )


# ------------------------------------------------------------------------------------------
# run identity and state files (shared by the protection and the attacks)
# ------------------------------------------------------------------------------------------
def resumable_loop(
    step: Callable[[], object],
    position: Callable[[], int],
    total: int,
    *,
    tracker,
    save: Callable[[], object],
    save_interrupted: Callable[[], object] | None = None,
    save_every: int = 0,
    state_path: Path | None = None,
    before: Callable[[], object] | None = None,
) -> bool:
    """Run ``step()`` until ``position()`` reaches ``total``; True when it was cancelled.

    The loop every long run shares (protection, attacks, image protection): ``save()`` every
    ``save_every`` steps (not after the last); on a Cancelled (``tracker``'s stop check), Ctrl-C or
    any exception a host raises from the progress callback, ``save_interrupted()`` (default
    ``save``) writes the resumable state first; Cancelled then returns True, anything else
    propagates, carrying ``state_path`` (the CLI prints it with the resume command). A
    TrainingDiverged propagates without saving (the state would hold the diverged weights).
    ``before()`` runs once after the first stop check (e.g. a snapshot at step 0).
    """
    from .errors import Cancelled, TrainingDiverged

    try:
        tracker.check_stop()
        if before is not None:
            before()
        while position() < total:
            step()
            if save_every and position() % save_every == 0 and position() < total:
                save()
    except BaseException as exc:
        if isinstance(exc, TrainingDiverged):
            raise
        (save_interrupted or save)()
        if not isinstance(exc, Cancelled):
            if state_path is not None:
                exc.state_path = state_path
            raise
        return True
    return False


def run_hash(settings: dict, model, subjects) -> str:
    """SHA-256 of the settings that shape a run, the model's weights and the subject photos."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(model.fingerprint().encode())
    for s in subjects:
        h.update(s.name.encode("utf-8", "surrogateescape"))  # a file name in any encoding
        h.update(s.image.tobytes())
    return h.hexdigest()


def state_file(state_path: str, output: str, cache_dir: str, identity: str, suffix: str, folder: str) -> Path:
    """The resumable state file: ``state_path``, else beside ``output``, else in the cache."""
    if state_path:
        return Path(state_path)
    if output:
        return Path(str(Path(output)) + suffix)
    from .pairs import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / folder / f"{identity[:20]}.pt"


STATE_MARKER = (
    "apdm_state"  # a key of every state dict apdm writes: how a state file is told from any other file
)


def write_state(path: Path, state: dict, identity: str, config: dict) -> Path:
    """A run's resumable state with its identity and settings, written atomically (a stop while
    writing leaves the previous state, never half a file)."""
    state = {**state, STATE_MARKER: 1, "identity": identity, "config": config}
    with atomic_path(path, overwrite=True) as tmp:
        torch.save(state, tmp)
    return path


def read_state(
    path: Path, identity: str, version: int, what: str = "run", grows: str = "outer_steps"
) -> dict:
    """The state of an interrupted run, refused when it cannot be read or belongs to another run
    (other model, images or settings); ``what`` names the run, ``grows`` the setting that may change."""
    label = "State file" if what == "run" else f"{what.capitalize()} state file"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{label} {path} cannot be read ({exc}); delete it to start over.") from exc
    if state.get("version") != version or state.get("identity") != identity:
        raise InputError(
            f"{label} {path} belongs to a different {what} (other model, images or settings). Resume with "
            f"exactly the same settings (only {grows} may grow), or delete the file to start over."
        )
    return state
