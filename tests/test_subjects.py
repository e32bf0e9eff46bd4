"""Several subjects in one protection run, and a subject added to an already protected model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import draw_photo, tree_hashes

import apdm_core.protection as protect_module
from apdm_core.cli import main
from apdm_core.errors import InputError
from apdm_core.export import read_subject_record
from apdm_core.protection import protect


@pytest.fixture()
def dog_dir(tmp_path):
    folder = tmp_path / "dog"
    folder.mkdir()
    for i in range(3):
        draw_photo(10 + i).save(folder / f"dog_{i}.png")
    return folder


DOG = {"instance_prompt": "a photo of zwx dog", "class_prompt": "a photo of dog"}


def test_two_subjects_take_turns_and_are_recorded(fast_config, dog_dir, tmp_path):
    out = tmp_path / "protected"
    config = fast_config(
        outer_steps=4, resync_every=1, output=str(out), subjects=[{"images": [str(dog_dir)], **DOG}]
    )
    result = protect(config)
    assert [h["subject"] for h in result.history] == [1, 2, 1, 2]
    record = read_subject_record(out)
    assert record["count"] == 4 + 3 and record["subjects"] == 2
    settings = json.loads((out / "apdm_config.json").read_text())
    (other,) = settings["subjects"]
    assert other["class_prompt"] == "a photo of dog" and other["instance_prompt"].startswith("salted-sha256:")
    assert str(dog_dir) not in json.dumps(settings)  # no paths


def test_more_subjects_from_the_command_line_and_preloaded(fast_config, subject_dir, dog_dir, tmp_path):
    cfg = fast_config()
    argv = ["protect", "--model", cfg.model, "--images", str(subject_dir), "--out", str(tmp_path / "cli"),
            "--subject", str(dog_dir), DOG["instance_prompt"], DOG["class_prompt"], "--outer-steps", "2",
            "--inner-steps", "1", "--num-class-images", "1", "--sample-steps", "1", "--device", "cpu",
            "--cache-dir", str(tmp_path / "c"), "--save-config", str(tmp_path / "used.yaml")]  # fmt: skip
    assert main(argv) == 0
    assert read_subject_record(tmp_path / "cli")["subjects"] == 2
    from apdm_core.config import ProtectConfig

    used = ProtectConfig.load(tmp_path / "used.yaml")
    assert used.subjects[0]["instance_prompt"] == DOG["instance_prompt"]
    # the API with preloaded photos of the other subject (a host's)
    photos = [draw_photo(20 + i) for i in range(3)]
    result = protect(
        fast_config(outer_steps=2, subjects=[{"images": ["unused"], **DOG}]), subject_images=[photos]
    )
    assert [h["subject"] for h in result.history] == [1, 2]


@pytest.mark.parametrize(
    "subject, message",
    [
        ({"instance_prompt": "a photo of zwx dog", "class_prompt": "a photo of dog"}, "Subject 2 has no photos"),
        ({"images": ["x"], "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog"},
         "same identifier 'sks'"),
        ({"images": ["x"], "instance_prompt": "a photo of zwx dog"}, "Subject 2 has no class_prompt"),
        ({"images": ["x"], **DOG, "photos": 1}, "unknown key"),
    ],
)  # fmt: skip
def test_bad_subjects_are_refused_before_any_work(fast_config, subject, message, tmp_path, monkeypatch):
    monkeypatch.setattr(protect_module, "prepare_subjects", lambda *a, **k: pytest.fail("work started"))
    before = tree_hashes(tmp_path)
    with pytest.raises(InputError, match=message):
        protect(fast_config(subjects=[subject]))
    assert tree_hashes(tmp_path) == before


def test_every_subject_gets_an_attacker_episode(fast_config, dog_dir):
    """The subjects take turns by episode (resync_every outer steps): too few outer steps would leave
    the later subjects unprotected without a word, so the run is refused before any work."""
    dog = [{"images": [str(dog_dir)], **DOG}]
    with pytest.raises(InputError, match="gives 1 episode.*at least 4"):
        fast_config(outer_steps=2, resync_every=2, subjects=dog)
    result = protect(fast_config(outer_steps=3, resync_every=2, inner_steps=1, subjects=dog))
    assert [h["subject"] for h in result.history] == [1, 1, 2]  # a partial last episode still counts


def test_every_subject_meets_every_attacker_kind(fast_config, dog_dir):
    """Subjects and attacker kinds both take turns by episode. Counted by the run's episodes, 2 subjects and
    [full, lora] would give subject 1 only DreamBooth and subject 2 only LoRA attackers; each subject's
    own episodes take the kinds in turn instead."""
    config = fast_config(outer_steps=4, resync_every=1, inner_steps=1, attacker_family=["full", "lora"],
                         lora_ranks=[2], loss="target", subjects=[{"images": [str(dog_dir)], **DOG}])  # fmt: skip
    history = protect(config).history
    seen = [(h["subject"], h["attacker"]) for h in history]
    assert seen == [(1, "full"), (2, "full"), (1, "lora-r2"), (2, "lora-r2")]


INTERLEAVED = dict(outer_steps=6, resync_every=2, inner_steps=1, interleave_subjects=True, loss="target",
                   attacker_family=["full", "lora"], lora_ranks=[2], lr_personalize_max=1e-3)  # fmt: skip


def test_interleaved_subjects_keep_their_own_attackers(fast_config, dog_dir, monkeypatch):
    """interleave_subjects: the subjects take turns by outer step; each one's attacker is parked between its
    turns and comes back where it was, relative to theta (theta' - theta unchanged while parked)."""
    from apdm_core.l2p import trainer as trainer_module

    original, offsets, returned = trainer_module.L2PTrainer.interleaved_episode, {}, []

    def offset(t):  # theta' - theta on the protected weights
        return [(p_prime - p).detach().clone() for p, p_prime in t.weights.protected_pairs]

    def spy(t):
        if t.attacker.current is not None:
            offsets[t._current_subject] = offset(t)
        episode = original(t)
        if episode.h > 0:  # a parked attacker came back
            returned.append(t.subject_index)
            for a, b in zip(offset(t), offsets[t.subject_index]):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        return episode

    monkeypatch.setattr(trainer_module.L2PTrainer, "interleaved_episode", spy)
    history = protect(fast_config(subjects=[{"images": [str(dog_dir)], **DOG}], **INTERLEAVED)).history
    assert [h["subject"] for h in history] == [1, 2, 1, 2, 1, 2]
    assert returned == [0, 1]  # steps 3 and 4 continue the subjects' first episodes; 5 and 6 start new ones
    assert [h["attacker"] for h in history] == ["full"] * 4 + ["lora-r2"] * 2
    lrs = [h["attack_lr"] for h in history]
    assert lrs[0] == lrs[2] != lrs[1] == lrs[3]  # each subject's episode kept its own drawn lr
    with pytest.raises(InputError, match="outer_steps=1 < 2"):
        fast_config(subjects=[{"images": [str(dog_dir)], **DOG}], **{**INTERLEAVED, "outer_steps": 1})


def test_an_interrupted_interleaved_run_resumes_exactly(fast_config, dog_dir, tmp_path):
    settings = dict(subjects=[{"images": [str(dog_dir)], **DOG}], **INTERLEAVED)
    full = protect(fast_config(state_path=str(tmp_path / "a.pt"), **settings))
    events = []
    config = fast_config(state_path=str(tmp_path / "b.pt"), **settings)
    stopped = protect(config, progress=events.append,
                      should_stop=lambda: sum(e.stage == "protect" for e in events) >= 3)  # fmt: skip
    assert stopped.cancelled and 0 < stopped.steps_done < 6
    resumed = protect(config, resume=True)
    for a, b in zip(full.model.unet.state_dict().values(), resumed.model.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["attack_lr"] for h in full.history] == [h["attack_lr"] for h in resumed.history]


def test_an_interrupted_multi_subject_run_resumes_exactly(fast_config, dog_dir, tmp_path):
    settings = dict(
        outer_steps=6,
        inner_steps=2,
        resync_every=2,
        loss="target",
        subjects=[{"images": [str(dog_dir)], **DOG}],
    )
    full = protect(fast_config(state_path=str(tmp_path / "a.pt"), **settings))
    events = []
    config = fast_config(state_path=str(tmp_path / "b.pt"), **settings)
    in_protect = lambda: sum(e.stage == "protect" for e in events)  # noqa: E731
    stopped = protect(config, progress=events.append, should_stop=lambda: in_protect() >= 7)  # inside step 4
    assert stopped.cancelled and stopped.steps_done == 3
    resumed = protect(config, resume=True)
    for a, b in zip(full.model.unet.state_dict().values(), resumed.model.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert (
        [h["subject"] for h in full.history] == [h["subject"] for h in resumed.history] == [1, 1, 2, 2, 1, 1]
    )


def test_a_subject_added_to_a_protected_model_keeps_the_earlier_round(fast_config, dog_dir, tmp_path, capsys):
    first = tmp_path / "a"
    protect(fast_config(outer_steps=1, output=str(first)))
    second = tmp_path / "b"
    # sequential: B from A's checkpoint, replaying A's terms (A among the subjects again)
    config = fast_config(
        model=str(first), outer_steps=2, output=str(second), subjects=[{"images": [str(dog_dir)], **DOG}]
    )
    protect(config)
    record = read_subject_record(second)
    (earlier,) = record["earlier"]
    assert earlier["count"] == 4 and record["count"] == 7 and "salt" in earlier
    argv = ["compare", "--base", str(first), "--protected", str(second), "--images", str(dog_dir), "--out",
            str(tmp_path / "report"), "--steps", "1", "--num-class-images", "1", "--sample-steps", "1", "--device",
            "cpu", "--num-samples", "1", "--eval-steps", "1", "--metrics", "denoise", "--utility-samples", "0",
            "--instance-prompt", DOG["instance_prompt"], "--class-prompt", DOG["class_prompt"], "--identifier", "zwx",
            "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "round 1: 4 photos of 1 subject(s)" in printed and "round 2: 7 photos of 2 subject(s)" in printed


def test_a_round_against_the_original_model(fast_config, tmp_path):
    """reference_model: a round that starts from a protected model takes its anchor (and targets and generated
    images) from the original model. With the original, the anchor pulls the moved model back from the first
    step (without it, theta starts equal to its reference); the protected model as its own reference is
    bit-identical to no reference; a model of another architecture is refused before any work."""
    from apdm_core.world import WORLD_MODEL_DIRS

    first = tmp_path / "a"
    protect(fast_config(outer_steps=2, lr_protect=1e-2, output=str(first)))
    again = dict(model=str(first), outer_steps=2, anchor_weight=1.0, anchor_prompts=["a photo of dog"])
    plain = protect(fast_config(**again))
    itself = protect(fast_config(**again, reference_model=str(first)))
    original = protect(fast_config(**again, reference_model=fast_config().model))
    assert plain.history[0]["anchor"] == 0.0 < original.history[0]["anchor"]
    assert [h["anchor"] for h in itself.history] == [h["anchor"] for h in plain.history]
    for a, b in zip(plain.model.unet.parameters(), itself.model.unet.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(InputError, match="same architecture"):
        protect(fast_config(**again, reference_model=str(WORLD_MODEL_DIRS["sdxl"])))
