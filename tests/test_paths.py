"""The one path rule and the state file policy, for every command and every path option.

Every path a command writes or deletes (output, state file, cache folder, saved config) is pointed
at every kind of input (a photo, the photo folder, a folder inside it, the model folder, a file
inside it, a folder around them, a symlink to any of these, a hard link to a photo or a model
file): each is refused with ``apdm: error:`` before any work, and every file under the test's
folder is byte-identical afterwards. Then: a state file is only replaced or deleted when apdm wrote
it; ``--resume --restart`` is refused; read-only and full-disk places fail before training; a full
disk during a save keeps the last state; a failed final write keeps the finished run; an
interrupted folder replace is mended; file names in any encoding work.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import draw_photo, tree_hashes

from apdm_core import driver, fileio
from apdm_core.cli import main
from apdm_core.errors import APDMError, InputError

REFUSED = r"is the input|inside the input|contains the input|hard link to the input"


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A model folder, a photo folder and links to them, in one folder whose every byte is checked."""
    root = tmp_path_factory.mktemp("world")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    photos = root / "photos"
    photos.mkdir()
    for i in range(4):
        draw_photo(i).save(photos / f"img_{i}.png")
    links = root / "links"
    links.mkdir()
    kinds = {
        "photo": photos / "img_0.png",
        "photos": photos,
        "photos/sub": photos / "sub",
        "model": model,
        "model/file": model / "unet" / "config.json",
        "model/sub": model / "sub",
        "around": root,
    }
    for name in ("photo", "photos", "model", "model/file"):
        link = links / f"sym_{name.replace('/', '_')}"
        link.symlink_to(kinds[name])
        kinds[f"symlink->{name}"] = link
    for name in ("photo", "model/file"):
        link = links / f"hard_{name.replace('/', '_')}"
        os.link(kinds[name], link)
        kinds[f"hardlink->{name}"] = link
    return {
        "root": root,
        "model": model,
        "photos": photos,
        "cache": root.parent / f"{root.name}-cache",
        **kinds,
    }


FILE_KINDS = ["photo", "photos", "photos/sub", "model", "model/file", "model/sub", "around", "symlink->photo",
              "symlink->photos", "symlink->model", "symlink->model/file", "hardlink->photo", "hardlink->model/file"]  # fmt: skip
# a cache folder may hold inputs (apdm only adds its hashed sub-folders there), never be or lie in one
CACHE_KINDS = [k for k in FILE_KINDS if k != "around"]

FAST = ["--device", "cpu", "--num-class-images", "1", "--sample-steps", "1"]


def commands(w: dict[str, Path], out: str) -> dict[str, list[str]]:
    m, p, c = str(w["model"]), str(w["photos"]), str(w["cache"])
    return {
        "protect": ["protect", "--model", m, "--images", p, "--out", out, "--outer-steps", "1", "--inner-steps",
                    "1", "--cache-dir", c, *FAST],
        "attack": ["attack", "--model", m, "--images", p, "--out", out, "--steps", "1", "--cache-dir", c, *FAST],
        "protect-images": ["protect-images", "--model", m, "--images", p, "--out", out, "--steps", "1",
                           "--cache-dir", c, *FAST],
        "evaluate": ["evaluate", "--model", m, "--images", p, "--out", out, "--device", "cpu", "--num-samples",
                     "1", "--eval-steps", "1", "--metrics", "denoise"],
        "compare": ["compare", "--base", m, "--protected", m, "--images", p, "--out", out, "--steps", "1",
                    "--cache-dir", c, "--num-samples", "1", "--eval-steps", "1", "--metrics", "denoise", *FAST],
        "export": ["export", "--model", m, "--out", out],
    }  # fmt: skip


# (command, option): the option's flag; None = the command's --out itself
OPTIONS = [
    ("protect", "--out"), ("protect", "--state-path"), ("protect", "--save-config"), ("protect", "--cache-dir"),
    ("attack", "--out"), ("attack", "--state-path"), ("attack", "--save-config"), ("attack", "--cache-dir"),
    ("protect-images", "--out"), ("protect-images", "--state-path"), ("protect-images", "--cache-dir"),
    ("evaluate", "--out"), ("compare", "--out"), ("compare", "--cache-dir"), ("export", "--out"),
]  # fmt: skip


def _argv(world, command: str, option: str, target: Path, tmp_path: Path) -> list[str]:
    argv = commands(world, str(tmp_path / "out"))[command]
    if option in argv:
        argv[argv.index(option) + 1] = str(target)
    else:
        argv += [option, str(target)]
    return argv


@pytest.mark.parametrize("command,option", OPTIONS, ids=[f"{c} {o}" for c, o in OPTIONS])
def test_every_written_path_is_checked_against_every_input(world, command, option, tmp_path, capsys):
    before = tree_hashes(world["root"])
    kinds = CACHE_KINDS if option == "--cache-dir" else FILE_KINDS
    if command == "export":  # reads the model only (a photo is not among its inputs)
        kinds = [k for k in kinds if "model" in k or k == "around"]
    for kind in kinds:
        assert main(_argv(world, command, option, world[kind], tmp_path)) == 2, (command, option, kind)
        err = capsys.readouterr().err
        assert err.startswith("apdm: error:"), (kind, err)
        assert any(w in err for w in REFUSED.split("|")), (kind, err)
        assert tree_hashes(world["root"]) == before, (command, option, kind)
    assert not (tmp_path / "out").exists()


def test_the_rule_resolves_links_both_ways(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"photo")
    (tmp_path / "link").symlink_to(photos)
    inputs = [("photos", tmp_path / "link")]  # the input named through a link, the output by its real name
    with pytest.raises(InputError, match="inside the input photos"):
        fileio.check_paths([("output", photos / "out")], inputs)
    os.link(photos / "a.png", tmp_path / "b.png")
    with pytest.raises(InputError, match="hard link to the input photos"):
        fileio.check_paths([("state file", tmp_path / "b.png")], [("photos", photos)])
    fileio.check_paths([("output", tmp_path / "elsewhere")], inputs)  # a path beside the inputs is fine
    fileio.check_paths([("cache folder", tmp_path)], inputs)  # a cache may hold inputs


# --- state files -------------------------------------------------------------------------------------
def test_a_file_apdm_did_not_write_is_never_taken_for_a_state_file(fast_config, tmp_path):
    other = tmp_path / "notes.pt"
    other.write_bytes(b"my own file")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "model.ckpt")  # a torch file, not a state
    for path in (other, tmp_path / "model.ckpt"):
        before = path.read_bytes()
        for flags in ({}, {"restart": True}, {"resume": True}):
            with pytest.raises(InputError, match="apdm did not write"):
                from apdm_core.protection import protect

                protect(fast_config(state_path=str(path)), **flags)
        assert path.read_bytes() == before
    assert not driver.is_apdm_state(other) and not driver.is_apdm_state(tmp_path / "model.ckpt")


def test_resume_and_restart_together_are_refused(world, tmp_path, capsys):
    for command in ("protect", "attack", "protect-images"):
        argv = commands(world, str(tmp_path / "out"))[command] + ["--resume", "--restart"]
        assert main(argv) == 2
        assert "--resume and --restart contradict" in capsys.readouterr().err


def test_an_interrupted_attack_is_never_started_over_and_resumes_exactly(
    world, tmp_path, capsys, monkeypatch
):
    from apdm_core.attack.base import AttackTrainer

    def argv(name: str) -> list[str]:
        args = commands(world, str(tmp_path / name))["attack"] + [
            "--state-path",
            str(tmp_path / f"{name}.pt"),
        ]
        args[args.index("--steps") + 1] = "4"
        return args

    assert main(argv("full")) == 0  # uninterrupted
    real_step = AttackTrainer.train_step

    def ctrl_c_at_step_3(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(AttackTrainer, "train_step", ctrl_c_at_step_3)
    assert main(argv("out")) == 130
    err = capsys.readouterr().err
    assert str(tmp_path / "out.pt") in err and "apdm attack" in err and "--resume" in err
    monkeypatch.setattr(AttackTrainer, "train_step", real_step)
    assert main(argv("out")) == 2  # the same command again: refused, the state is kept
    assert "--resume" in capsys.readouterr().err and (tmp_path / "out.pt").exists()
    assert main(argv("out") + ["--resume"]) == 0
    assert not (tmp_path / "out.pt").exists()

    def weights(name: str) -> dict[str, str]:
        return {Path(k).relative_to(tmp_path / name).as_posix(): v for k, v in tree_hashes(tmp_path / name).items()
                if k.endswith(".safetensors")}  # fmt: skip

    assert weights("full") and weights("full") == weights("out")  # bit for bit the same weights


# --- before any work: read-only and full places --------------------------------------------------------
def _no_training(monkeypatch):
    import apdm_core.protection as protect_module

    def fail(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(protect_module, "prepare_subjects", fail)


def test_a_read_only_output_folder_fails_before_training(fast_config, tmp_path, monkeypatch):
    from apdm_core.protection import protect

    _no_training(monkeypatch)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real = driver.tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):  # a read-only file system (root ignores chmod, so patch the writer)
        if dir is not None and Path(dir) == readonly:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(driver.tempfile, "mkstemp", mkstemp)
    with pytest.raises(InputError, match="does not accept new files"):
        protect(fast_config(output=str(readonly / "protected")))


def test_a_full_disk_fails_before_training(fast_config, tmp_path, monkeypatch):
    from apdm_core.protection import protect

    _no_training(monkeypatch)
    monkeypatch.setattr(
        driver.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)
    )
    with pytest.raises(InputError, match="Not enough room"):
        protect(fast_config(output=str(tmp_path / "protected")))


@pytest.mark.parametrize(
    "error",
    [RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 192 vs 92"),
     RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"),
     OSError(errno.ENOSPC, "No space left on device")],
)  # fmt: skip
def test_a_full_disk_during_a_save_keeps_the_last_state(fast_config, tmp_path, monkeypatch, error):
    from apdm_core import training
    from apdm_core.protection import protect

    state = tmp_path / "run.pt"
    cfg = fast_config(output=str(tmp_path / "out"), state_path=str(state), outer_steps=4, save_every=1)
    calls = []
    real_save = torch.save

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) >= 2:  # from the second state save on, the disk is full
            Path(f).write_bytes(b"partial")
            raise error
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(training.torch, "save", save)
    with pytest.raises(APDMError, match="the disk is full"):
        protect(cfg)
    assert driver.is_apdm_state(state)  # the first save, whole
    assert torch.load(state, weights_only=True)["step"] == 1
    assert not list(tmp_path.glob(".run.pt.*"))  # no partial file left


def test_a_failed_final_write_keeps_the_finished_run(fast_config, tmp_path, monkeypatch):
    import apdm_core.protection as protect_module

    cfg = fast_config(output=str(tmp_path / "out"))
    real = protect_module.write_output

    def full(*a, **k):
        raise APDMError("Writing out failed: the disk is full (No space left on device).")

    monkeypatch.setattr(protect_module, "write_output", full)
    with pytest.raises(APDMError, match="--resume"):
        protect_module.protect(cfg)
    state = Path(str(tmp_path / "out") + ".apdm-state.pt")
    assert driver.is_apdm_state(state)
    monkeypatch.setattr(protect_module, "write_output", real)
    steps = []
    result = protect_module.protect(cfg, resume=True, progress=lambda e: steps.append(e.stage))
    assert result.output == tmp_path / "out" and (tmp_path / "out" / "unet").is_dir()
    assert "protect" not in steps  # no training again: only the write
    assert not state.exists()


# --- interrupted replaces, file names ------------------------------------------------------------------
def test_an_interrupted_overwrite_is_mended(tmp_path, caplog):
    out = tmp_path / "result"
    with fileio.atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("old")
    aside = tmp_path / ".result.old-4242"
    os.replace(out, aside)  # killed between "old aside" and "new in"
    with fileio.atomic_path(out, overwrite=True) as tmp:  # the next write puts the old one back first
        assert (out / "a.txt").read_text() == "old" and not aside.exists()
        tmp.mkdir()
        (tmp / "a.txt").write_text("new")
    assert "back in place" in caplog.text
    shutil.copytree(out, aside)  # killed while deleting the old one: the leftover is removed, with a word
    fileio.check_target(out, overwrite=True)
    assert not aside.exists() and "removed .result.old-4242" in caplog.text
    assert (out / "a.txt").read_text() == "new"


def test_file_names_in_any_encoding(tiny_model_dir, tmp_path, capsys):
    photos = tmp_path / os.fsdecode(b"fot\xf6s")  # latin-1 bytes: not UTF-8
    photos.mkdir()
    for i in range(4):
        draw_photo(i).save(photos / os.fsdecode(b"caf\xe9-%d.png" % i))
    fast = [
        "--device",
        "cpu",
        "--num-class-images",
        "1",
        "--sample-steps",
        "1",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    out = tmp_path / "protected"
    assert main(["protect", "--model", str(tiny_model_dir), "--images", str(photos), "--out", str(out),
                 "--outer-steps", "1", "--inner-steps", "1", *fast]) == 0  # fmt: skip
    assert main(["protect-images", "--model", str(tiny_model_dir), "--images", str(photos), "--out",
                 str(tmp_path / "imgs"), "--steps", "1", *fast]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "imgs").glob("*.png")) == sorted(
        p.name for p in photos.iterdir()
    )
    assert main(["attack", "--model", str(out), "--images", str(photos), "--out", str(tmp_path / "att"),
                 "--steps", "1", *fast]) == 0  # fmt: skip
    capsys.readouterr()
    # the model libraries need UTF-8 model paths: a clear refusal, shown without a crash
    bad = str(tmp_path / os.fsdecode(b"mod\xe8le"))
    assert (
        main(["protect", "--model", str(tiny_model_dir), "--images", str(photos), "--out", bad, *fast]) == 2
    )
    shutil.copytree(tiny_model_dir, bad)
    assert (
        main(["attack", "--model", bad, "--images", str(photos), "--out", str(tmp_path / "a2"), *fast]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("not valid UTF-8") == 2 and "mod\\xe8le" in err


def test_help_texts_print_as_written():
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(["attack", "--help"])
    text = buf.getvalue()
    assert "~30% slower" in text.replace("\n", " ").replace("  ", " ") and "option_strings" not in text
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(["protect", "--help"])
    assert "--allow-pickle" in buf.getvalue()  # the pickle refusal's advice works for protect too
