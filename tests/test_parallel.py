"""Scale-out: 2 gloo processes (torchrun, CPU) compute what one process computes, with DDP and FSDP.

One launch runs both (about a minute on 2 CPU cores); the batch of 2 pair/prior terms is split
1 + 1 over the processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apdm_core.config import ProtectConfig
from apdm_core.errors import InputError
from apdm_core.loading import load_model
from apdm_core.parallel import setup_parallel
from apdm_core.protection import protect

ROOT = Path(__file__).resolve().parents[1]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten().float() for t in tensors])


@pytest.mark.distributed
def test_two_processes_compute_what_one_computes(fast_config, tmp_path, tiny_model_dir):
    config = fast_config(batch_size=2, outer_steps=2, inner_steps=1, lr_protect=1e-5, lr_personalize=1e-5)
    protect(config.replace(state_path=str(tmp_path / "one.pt")), keep_state=True)  # also fills the pair cache
    config.save(tmp_path / "config.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_child.py"), str(tmp_path / "config.json"),
           str(tmp_path / "ddp.pt"), str(tmp_path / "fsdp.pt")]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    theta0 = flat(load_model(tiny_model_dir).unet.state_dict().values())
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    update_one = flat(one["unet"].values()) - theta0
    assert float(update_one.abs().max()) > 1e-5  # theta moved: the comparison is not vacuous
    for kind in ("ddp", "fsdp"):
        two = torch.load(tmp_path / f"{kind}.pt", weights_only=True)
        assert two["step"] == one["step"] == 2
        for h1, h2 in zip(one["history"], two["history"]):
            for key in ("loss_per", "loss_protect", "dpo", "prior", "implicit_acc"):
                assert h2[key] == pytest.approx(h1[key], rel=1e-5), (kind, key)
        update_two = flat(two["unet"].values()) - theta0
        # same computation up to rounding (AdamW turns rounding-level gradient differences into
        # a fraction of a step where the gradient is near zero; see tests/test_perf.py)
        assert float((update_two - update_one).norm() / update_one.norm()) < 1e-2, kind


@pytest.mark.parametrize(
    "overrides,env,message",
    [
        ({"distributed": "ddp"}, {}, "batch_size=1 cannot be split over 2 processes"),
        ({"distributed": "no", "batch_size": 2}, {}, "every process would redo the same run"),
        ({"distributed": "ddp", "batch_size": 2}, {"ACCELERATE_USE_FSDP": "true"}, "--distributed fsdp"),
        ({"batch_size": 2}, {"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
    ],
)
def test_launch_mistakes_are_explained(monkeypatch, overrides, env, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(InputError, match=message):
        setup_parallel(ProtectConfig(**overrides), "cpu")


def test_one_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parallel = setup_parallel(ProtectConfig(distributed="fsdp"), "cpu")
    assert not parallel.active and parallel.shard(4) is None and parallel.mean({"a": 1.0}) == {"a": 1.0}
