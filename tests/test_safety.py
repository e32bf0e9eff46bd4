"""Reliability and security (README "Failure handling"): no user data lost, no run silently lost,
bad settings refused with the field named. Every test hashes the inputs before and after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import tree_hashes

from apdm_core import fileio
from apdm_core.config import ProtectConfig
from apdm_core.errors import InputError
from apdm_core.interrupts import uninterrupted
from apdm_core.l2p import L2PTrainer
from apdm_core.loading import load_model
from apdm_core.protection import protect


# --- folders are never deleted unless apdm wrote them ------------------------------------------
def test_a_folder_apdm_did_not_write_is_never_replaced(tmp_path):
    user = tmp_path / "photos_and_more"
    user.mkdir()
    (user / "keep.txt").write_text("precious")
    before = tree_hashes(user)
    with pytest.raises(InputError, match="did not write"):
        with fileio.atomic_path(user, overwrite=True) as tmp:
            tmp.mkdir()
    assert tree_hashes(user) == before
    with pytest.raises(InputError, match="did not write"):  # a state path naming a folder: refused too
        fileio.atomic_write_text(user, "state")
    assert tree_hashes(user) == before


def test_an_apdm_folder_is_replaced_old_aside_new_in(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with fileio.atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("1")
    assert (out / fileio.MARKER).exists()
    with fileio.atomic_path(out, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [fileio.MARKER, "b.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no leftovers
    # a crash while moving the new folder in puts the old one back
    real = os.replace

    def flaky(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError(5, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", flaky)
    with pytest.raises(OSError):
        with fileio.atomic_path(out, overwrite=True) as tmp:
            tmp.mkdir()
            (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == [fileio.MARKER, "b.txt"]


def test_a_file_never_replaces_a_folder(tmp_path):
    out = tmp_path / "out"
    with fileio.atomic_path(out) as tmp:
        tmp.mkdir()
    with pytest.raises(InputError, match="is a folder"):
        fileio.atomic_write_text(out, "x")
    assert out.is_dir()


def test_outputs_inside_or_around_an_input_are_refused_before_training(fast_config, tmp_path, monkeypatch):
    import apdm_core.protection as protect_module

    monkeypatch.setattr(protect_module, "prepare_subjects", lambda *a, **k: pytest.fail("training started"))
    cfg = fast_config()
    model_dir, photos = cfg.model, cfg.images[0]
    original = tmp_path / "original"  # reference_model is an input too, also through a symlink
    original.mkdir()
    (tmp_path / "link").symlink_to(original)
    before = tree_hashes(tmp_path)
    for out, why in [
        (os.path.join(model_dir, "protected"), "inside the input"),
        (os.path.join(photos, "protected"), "inside the input"),
        (str(tmp_path), "contains the input"),
    ]:
        with pytest.raises(InputError, match=why):
            protect(fast_config(output=out), overwrite=True)
    for out in (original / "protected", tmp_path / "link" / "protected"):
        with pytest.raises(InputError, match="inside the input"):
            protect(fast_config(output=str(out), reference_model=str(original)), overwrite=True)
    with pytest.raises(InputError, match="is the input photos .* itself"):
        protect(fast_config(state_path=photos))
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(InputError, match="a state path must be a file"):
        protect(fast_config(state_path=str(tmp_path / "a_folder")))
    (tmp_path / "a_folder").rmdir()
    assert tree_hashes(tmp_path) == before


# --- no run silently lost ------------------------------------------------------------------------
def test_a_saved_state_is_never_silently_started_over(fast_config, tmp_path):
    config = fast_config(outer_steps=3, state_path=str(tmp_path / "s.pt"))
    events = []
    stopped = protect(
        config, progress=events.append, should_stop=lambda: sum(e.stage == "protect" for e in events) >= 3
    )
    assert stopped.cancelled and (tmp_path / "s.pt").exists()
    with pytest.raises(InputError, match="--resume.*--restart"):
        protect(config)
    assert (tmp_path / "s.pt").exists()
    assert protect(config, restart=True).steps_done == 3 and not (tmp_path / "s.pt").exists()


def test_ctrl_c_prints_the_state_file_and_the_resume_command(fast_config, tmp_path, capsys, monkeypatch):
    from apdm_core import cli

    state = tmp_path / "run.pt"
    cfg = fast_config(outer_steps=5)
    argv = ["protect", "--model", cfg.model, "--images", cfg.images[0], "--out", str(tmp_path / "out"),
            "--outer-steps", "5", "--inner-steps", "2", "--num-class-images", "2", "--sample-steps", "2",
            "--cache-dir", cfg.cache_dir, "--state-path", str(state), "--device", "cpu"]  # fmt: skip

    def interrupt_at_outer_2(event):
        if event.stage == "protect" and event.outer == 2:
            raise KeyboardInterrupt

    import apdm_core.protection as protect_module

    with monkeypatch.context() as m:
        m.setattr(
            protect_module,
            "protect",
            lambda config, progress=None, **kw: protect(config, interrupt_at_outer_2, **kw),
        )
        assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert str(state) in err and "--resume" in err and state.exists()
    assert cli.main([*argv, "--resume"]) == 0 and not state.exists()


def test_sigint_inside_an_update_waits_for_its_end():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with uninterrupted():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("update finished")
    assert done == ["update finished"]


def test_ctrl_c_during_the_outer_update_resumes_exactly(fast_config, tmp_path, monkeypatch):
    full = protect(fast_config(outer_steps=3, state_path=str(tmp_path / "a.pt")))
    real = L2PTrainer.apply_outer_update

    def interrupted_update(self, *args):
        out = real(self, *args)
        if self.step == 1:  # the second outer step: SIGINT after theta changed, before the counter moved
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(L2PTrainer, "apply_outer_update", interrupted_update)
    config = fast_config(outer_steps=3, state_path=str(tmp_path / "b.pt"))
    with pytest.raises(KeyboardInterrupt):
        protect(config)
    monkeypatch.setattr(L2PTrainer, "apply_outer_update", real)
    resumed = protect(config, resume=True)
    assert resumed.steps_done == 3
    for a, b in zip(full.model.unet.state_dict().values(), resumed.model.unet.state_dict().values()):
        assert torch.equal(a, b)


# --- the documented API, settings checked by type --------------------------------------------------
def test_the_readme_import_gives_a_callable_protect():
    code = ("import apdm_core.protection, apdm_core.l2p, types, sys; from apdm_core import ProtectConfig, protect; "
            "sys.exit(0 if isinstance(protect, types.FunctionType) else 1)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("outer_steps", 2.5, "outer_steps=2.5 is not a whole number"),
        ("seed", 1.7, "seed=1.7 is not a whole number"),
        ("lr_protect", "fast", "lr_protect='fast' is not a number"),
        ("outer_steps", True, "is not a whole number"),
    ],
)
def test_config_values_are_checked_by_type(field, value, message):
    with pytest.raises(InputError, match=message):
        ProtectConfig(**{field: value})


def test_yaml_numbers_in_strings_become_numbers(tmp_path):
    from apdm_core.attack import AttackConfig

    path = tmp_path / "run.yaml"
    path.write_text("lr_protect: 5e-6\nouter_steps: 10.0\nlr_personalize: '1e-5'\n")
    cfg = ProtectConfig.load(path)
    assert cfg.lr_protect == 5e-6 and cfg.outer_steps == 10 and isinstance(cfg.outer_steps, int)
    assert AttackConfig(lr="5e-4", steps="400").lr == 5e-4
    with pytest.raises(InputError, match="AttackConfig.steps=2.5"):
        AttackConfig(steps=2.5)


def test_pickles_are_refused_on_a_torch_without_safe_weights_only(tmp_path, monkeypatch):
    from apdm_core import checkpoint

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, path)
    assert checkpoint.safe_weights_only("2.6.0") and not checkpoint.safe_weights_only("2.1.2+cu121")
    monkeypatch.setattr(torch, "__version__", "2.1.2")
    with pytest.raises(InputError, match="CVE-2025-32434"):
        checkpoint.read_checkpoint(path, allow_pickle=True)


def test_the_callers_model_is_left_as_it_was_on_every_path(fast_config, monkeypatch):
    model = load_model(fast_config().model)
    model.unet.train()
    model.unet.conv_in.weight.requires_grad_(True)
    flags = lambda: ([p.requires_grad for p in model.unet.parameters()], model.unet.training)  # noqa: E731
    before = flags()
    protect(fast_config(outer_steps=1), model=model)
    assert flags() == before
    monkeypatch.setattr(L2PTrainer, "personalization_loss",
                        lambda self, unet: torch.tensor(float("nan"), requires_grad=True))  # fmt: skip
    with pytest.raises(Exception, match="nan"):
        protect(fast_config(outer_steps=1), model=model)
    assert flags() == before


def test_the_accumulator_check_catches_a_replaced_grad(fast_config):
    from test_protect import make_trainer

    trainer = make_trainer(fast_config())
    trainer.outer_step()  # the real torch adds in place: the check passed
    assert trainer.weights._alias_checked
    trainer.weights._alias_checked = False
    for p in trainer.params_p:
        p.grad = torch.zeros_like(p)  # not the accumulator
    with pytest.raises(RuntimeError, match="did not reach the accumulator"):
        trainer.check_accumulation()
