"""Scale-out of the L2P loop over several processes (``accelerate launch`` / ``torchrun``).

Data parallelism over the batch of pair/prior terms: every process draws the whole batch
from the same seeded generator (so the random stream is the one of a single-process run),
keeps its own slice of the samples, and the gradients are averaged by the library:

- ``ddp``: ``accelerate``'s ``prepare_model`` wraps theta' in DistributedDataParallel;
- ``fsdp``: theta' and the reference UNet are sharded with PyTorch's FSDP2 ``fully_shard``
  (one unit per UNet block), and so are the gradients of theta', the attacker's AdamW states and
  the accumulator: for UNets whose training state does not fit one device. theta and the outer
  AdamW stay whole in CPU memory (as with ``offload_outer``); they are used once per outer step.

With equal slices the average of the per-process means is the mean over the whole batch, so
N processes compute what one process computes with the same ``batch_size`` (up to rounding).
Nothing here implements a collective: the process group, the wrappers, the reductions and
the stop trigger are accelerate's and PyTorch's.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from .errors import InputError

log = logging.getLogger(__name__)


def launched_world_size() -> int:
    """Number of processes of the launcher that started us (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


class Parallel:
    """What the trainer needs to know about the other processes; a no-op for one process."""

    def __init__(self, kind: str = "no", accelerator=None) -> None:
        self.kind = kind
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world_size = accelerator.num_processes if accelerator is not None else 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        return torch.device(self.accelerator.device) if self.accelerator is not None else None

    # --- data -------------------------------------------------------------------------------
    def shard(self, batch_size: int) -> slice | None:
        """This process's slice of a batch of ``batch_size`` samples (None: the whole batch)."""
        if not self.active:
            return None
        per = batch_size // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    # --- models -----------------------------------------------------------------------------
    def wrap_trained(self, unet):
        """The module to run forwards through for a trained UNet (DDP wrapper / sharded in place)."""
        if self.kind == "ddp" and self.active:
            return self.accelerator.prepare_model(unet)
        if self.kind == "fsdp" and self.active:
            return shard_unet(unet)
        return unet

    def wrap_frozen(self, unet):
        if self.kind == "fsdp" and self.active:
            return shard_unet(unet)
        return unet

    # --- agreement between processes ----------------------------------------------------------
    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average logged scalars over the processes (every process gets the same numbers)."""
        if not self.active or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        t = self.accelerator.reduce(t, "mean")
        return dict(zip(keys, t.tolist()))

    def any_stop(self, local: bool) -> bool:
        """True on every process when any process was asked to stop (accelerate's trigger)."""
        if not self.active:
            return local
        if local:
            self.accelerator.set_trigger()
        return self.accelerator.check_trigger()

    def main_first(self):
        """Context: the main process runs the block first (it fills the pair cache), then the others."""
        if not self.active:
            return contextlib.nullcontext()
        return self.accelerator.main_process_first()

    def wait(self) -> None:
        if self.active:
            self.accelerator.wait_for_everyone()


def setup_parallel(config, device_type: str) -> Parallel:
    """The process layout for ``config.distributed`` (accelerate's Accelerator when >1 process)."""
    kind = config.distributed
    world = launched_world_size()
    env = {
        k: os.environ.get(f"ACCELERATE_USE_{k}", "").lower() in ("1", "true") for k in ("FSDP", "DEEPSPEED")
    }
    if world > 1 and env["DEEPSPEED"]:
        raise InputError(
            "accelerate is configured for DeepSpeed, which the protection loop does not use; launch with "
            "`accelerate launch --multi_gpu` and --distributed ddp or fsdp."
        )
    if kind == "auto":
        kind = ("fsdp" if env["FSDP"] else "ddp") if world > 1 else "no"
    if kind == "ddp" and env["FSDP"] and world > 1:
        raise InputError(
            "accelerate is configured for FSDP but distributed='ddp'; pass --distributed fsdp (the engine "
            "shards the UNets itself) or launch with `accelerate launch --multi_gpu`."
        )
    if world == 1:
        if kind in ("ddp", "fsdp"):
            log.warning("distributed=%r but only one process was launched; running single-process.", kind)
        return Parallel("no")
    if kind == "no":
        raise InputError(
            f"{world} processes were launched but distributed='no': every process would redo the same run "
            "and write the same output. Pass --distributed ddp (or fsdp), or run without accelerate launch."
        )
    if config.batch_size % world:
        raise InputError(
            f"batch_size={config.batch_size} cannot be split over {world} processes: set --batch-size to a "
            f"multiple of {world} (distributed={kind} splits the batch of pair/prior terms), or launch "
            "fewer processes."
        )
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device_type == "cpu", mixed_precision="no")
    return Parallel(kind, accelerator)


# ------------------------------------------------------------------------------------------
# FSDP2
# ------------------------------------------------------------------------------------------
def shard_unet(unet):
    """Shard a diffusers UNet with FSDP2: one unit per down/mid/up block, then the root."""
    from torch.distributed.fsdp import fully_shard

    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        if block is not None:
            fully_shard(block)
    fully_shard(unet)
    return unet


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"  # no torch.distributed import on builds without it


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src, where dst may be an FSDP2 shard (DTensor) and src a full tensor on any device."""
    if _is_dtensor(dst):  # every process holds the full src: take the local shard, no communication
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements, src_data_rank=None)
    dst.copy_(src)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (an all-gather), or ``t`` itself."""
    return t.full_tensor() if _is_dtensor(t) else t
