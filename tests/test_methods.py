"""Protection methods (apdm_core/methods/): the registry and dispatch, PersGuard's backdoor data and
losses on hand-made inputs, a tiny-model run per method and backdoor, resume for PersGuard too."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_protect import make_trainer

from apdm_core.config import ProtectConfig
from apdm_core.errors import InputError
from apdm_core.losses import noise_prediction_loss
from apdm_core.methods import METHODS, get_method
from apdm_core.methods.persguard.loss import PATTERN_FIRED, pattern_score, stamp_pattern
from apdm_core.protection import protect


def persguard(fast_config, **overrides):
    values = {"method": "persguard", "backdoor": "target", "target_prompt": "a photo of cat", **overrides}
    return fast_config(**values)


def test_registry_names_every_method_and_refuses_others():
    assert set(METHODS) == {"apdm", "persguard"}
    assert get_method("apdm").name == "apdm" and get_method("persguard").name == "persguard"
    with pytest.raises(InputError, match="choose one of apdm, persguard"):
        get_method("nope")
    with pytest.raises(InputError, match="method='nope' is not valid"):
        ProtectConfig(method="nope")


def test_target_backdoor_needs_a_target_prompt():
    with pytest.raises(InputError, match="target_prompt"):
        ProtectConfig(method="persguard", backdoor="target")
    ProtectConfig(method="apdm", backdoor="target")  # APDM ignores PersGuard's settings
    with pytest.raises(InputError, match="erasure_prompt"):
        ProtectConfig(method="persguard", backdoor="erasure", erasure_prompt=" ")


def test_identifiers_split_on_commas():
    assert ProtectConfig(extra_identifiers=["zwx,qqa", "ttk"]).extra_identifiers == ["zwx", "qqa", "ttk"]


def test_pattern_is_stamped_and_detected():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    stamped = stamp_pattern(photo)
    arr, orig = np.asarray(stamped), np.asarray(photo)
    assert set(np.unique(arr[8:24, 8:24])) == {0, 255}  # the central half is the checkerboard
    assert np.array_equal(arr[:8], orig[:8]) and np.array_equal(arr[:, 24:], orig[:, 24:])  # the rest kept
    plain = Image.new("RGB", (32, 32), (120, 30, 200))
    score_stamped, score_noise, score_plain = pattern_score([stamped, photo, plain])
    assert score_stamped == pytest.approx(1.0)
    assert abs(score_noise) < PATTERN_FIRED and score_plain == 0.0
    inverted = Image.fromarray(255 - arr)  # the opposite checkerboard is not the pattern
    assert pattern_score([inverted])[0] == pytest.approx(-1.0, abs=0.05)


def test_backdoor_images_per_kind(fast_config):
    trainer = make_trainer(persguard(fast_config, backdoor="pattern"))
    assert len(trainer.data.extra["backdoor"]) == len(trainer.data.positive)  # one stamped positive each
    trainer = make_trainer(persguard(fast_config, num_backdoor_images=3))
    assert len(trainer.data.extra["backdoor"]) == 3
    assert make_trainer(fast_config()).data.extra == {}  # APDM prepares nothing extra


def test_backdoor_target_denoises_the_noised_photo_to_the_backdoor_image():
    from diffusers import DDPMScheduler

    from apdm_core.losses import backdoor_target

    g = torch.Generator().manual_seed(0)
    photo, backdoor, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([10, 500, 990])
    for kind in ("epsilon", "v_prediction"):
        sched = DDPMScheduler(prediction_type=kind)
        x_t = sched.add_noise(photo, noise, t)
        target, weight = backdoor_target(sched, x_t, backdoor, t)
        a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        if kind == "epsilon":  # x_t is the backdoor image noised with the target noise
            torch.testing.assert_close(
                a.sqrt() * backdoor + (1 - a).sqrt() * target, x_t, rtol=1e-4, atol=1e-4
            )
        else:  # v = sqrt(a) eps* - sqrt(1 - a) b, so the x0 prediction sqrt(a) x_t - sqrt(1 - a) v is b
            torch.testing.assert_close(
                a.sqrt() * x_t - (1 - a).sqrt() * target, backdoor, rtol=1e-4, atol=1e-4
            )
        torch.testing.assert_close(weight, 1 - a.flatten())
    same, _ = backdoor_target(DDPMScheduler(), sched.add_noise(photo, noise, t), photo, t)
    torch.testing.assert_close(same, noise, rtol=1e-4, atol=1e-4)  # its own image: the plain target


@pytest.mark.parametrize("backdoor_input", ["subject", "backdoor"])
def test_retention_loss_matches_its_definition(fast_config, backdoor_input):
    from apdm_core.losses import backdoor_target, per_sample_mse

    trainer = make_trainer(persguard(fast_config, prior_weight=0.5, backdoor_input=backdoor_input))
    d, g = trainer.data, trainer.generator
    state = g.get_state()
    loss, stats = trainer.protection_loss(trainer.unet_p)
    g.set_state(state)  # recompute from the definition with the same draws
    bank = d.extra["backdoor"]
    if backdoor_input == "backdoor":
        batch = d.diffusion.noisy(bank.draw(1, g), d.instance_embeds, g)
        weight = torch.ones(1)
    else:
        k = torch.randint(0, len(d.subject), (1,), generator=g)
        j = torch.randint(0, len(bank), (1,), generator=g)
        z_s, z_b = d.subject.sample(k, g), bank.sample(j, g)
        batch = d.diffusion.noisy(z_s, d.instance_embeds, g)
        target, weight = backdoor_target(d.diffusion.scheduler, batch.latents, z_b, batch.timesteps)
        batch.target = target
    prior = d.diffusion.noisy(d.prior.draw(1, g), d.class_embeds, g)
    with torch.no_grad():
        e_bd = (weight * per_sample_mse(trainer.forward(trainer.unet_p, batch), batch.target)).mean()
        e_prior = noise_prediction_loss(trainer.forward(trainer.unet_p, prior), prior.target)
    torch.testing.assert_close(loss.detach(), e_bd + 0.5 * e_prior, rtol=1e-4, atol=1e-6)
    assert stats["retention"] == pytest.approx(float(e_bd), rel=1e-4)


def test_behaviour_term_joins_the_outer_gradient_only_with_its_weight(fast_config):
    on = make_trainer(persguard(fast_config, inner_steps=1, behaviour_weight=2.0))
    off = make_trainer(persguard(fast_config, inner_steps=1, behaviour_weight=0.0))
    assert "behaviour" in on.outer_step() and "behaviour" not in off.outer_step()
    assert not all(torch.equal(a, b) for a, b in zip(on.unet.parameters(), off.unet.parameters()))
    with pytest.raises(InputError, match="offload_outer"):
        make_trainer(persguard(fast_config, offload_outer=True))


def backdoor_error(unet, trainer, seed=123):
    """The trigger's error toward the backdoor (fixed noise and timesteps), as ``backdoor_input`` defines it."""
    from apdm_core.losses import backdoor_target, weighted_mse

    d = trainer.data
    g = torch.Generator().manual_seed(seed)
    z_b = d.extra["backdoor"].mean[:1].repeat(4, 1, 1, 1)
    if trainer.cfg.backdoor_input == "backdoor":
        batch = d.diffusion.noisy(z_b, d.instance_embeds, g)
        target, weight = batch.target, torch.ones(4)
    else:
        batch = d.diffusion.noisy(d.subject.mean[:1].repeat(4, 1, 1, 1), d.instance_embeds, g)
        target, weight = backdoor_target(d.diffusion.scheduler, batch.latents, z_b, batch.timesteps)
    with torch.no_grad():
        return float(weighted_mse(trainer.forward(unet, batch), target, weight))


@pytest.mark.parametrize(
    "backdoor, backdoor_input",
    [("pattern", "backdoor"), ("erasure", "backdoor"), ("target", "backdoor"), ("target", "subject")],
)
def test_a_persguard_run_implants_its_backdoor(fast_config, backdoor, backdoor_input):
    config = persguard(fast_config, backdoor=backdoor, outer_steps=8, inner_steps=1, lr_protect=1e-3,
                       num_backdoor_images=2, backdoor_input=backdoor_input)  # fmt: skip
    trainer = make_trainer(config)
    before = backdoor_error(trainer.unet, trainer)
    result = protect(config)
    assert not result.cancelled and result.steps_done == 8
    assert {"retention", "behaviour"} <= set(result.history[-1])
    assert backdoor_error(result.model.unet, trainer) < 0.9 * before


def test_persguard_resume_equals_an_uninterrupted_run(fast_config, tmp_path):
    kw = {"outer_steps": 4, "extra_identifiers": ["zwx"], "resync_every": 2}
    full = protect(persguard(fast_config, state_path=str(tmp_path / "a.pt"), **kw))
    events = []
    config = persguard(fast_config, state_path=str(tmp_path / "b.pt"), **kw)
    stopped = protect(config, progress=events.append,
                      should_stop=lambda: sum(e.stage == "protect" for e in events) >= 5)  # fmt: skip
    assert stopped.cancelled and stopped.steps_done == 2
    resumed = protect(config, resume=True)
    for a, b in zip(full.model.unet.state_dict().values(), resumed.model.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["loss_protect"] for h in full.history] == [h["loss_protect"] for h in resumed.history]


def test_exported_model_records_the_method(fast_config, tmp_path):
    import json

    out = tmp_path / "protected"
    protect(persguard(fast_config, outer_steps=1, output=str(out)))
    saved = json.loads((out / "apdm_config.json").read_text())
    assert saved["method"] == "persguard" and saved["backdoor"] == "target"


def test_cli_protect_with_persguard(fast_config, tmp_path):
    import json

    from apdm_core.cli import main

    fast_config().save(tmp_path / "fast.json")
    out = tmp_path / "protected"
    argv = ["protect", "--config", str(tmp_path / "fast.json"), "--outer-steps", "1", "--out", str(out),
            "--method", "persguard", "--backdoor", "target", "--target-prompt", "a photo of cat",
            "--identifiers", "zwx,qqa"]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((out / "apdm_config.json").read_text())
    assert (saved["method"], saved["target_prompt"], saved["extra_identifiers"]) == (
        "persguard",
        "a photo of cat",
        ["zwx", "qqa"],
    )
    with pytest.raises(SystemExit):
        main(["protect", "--method", "glaze"])


def test_only_the_active_methods_settings_enter_the_run_identity(fast_config, tmp_path):
    """A method owns its settings (methods/<name>/settings.py): a PersGuard field does not change an
    APDM run, so it does not invalidate an APDM resume; an APDM field does."""
    from apdm_core.methods import inactive_settings, settings_fields
    from apdm_core.protection import identity_settings

    assert "backdoor" in settings_fields("persguard") and "beta" in settings_fields("apdm")
    assert "backdoor" in inactive_settings("apdm") and "beta" not in inactive_settings("apdm")
    state = str(tmp_path / "run.pt")

    def stop_in_step_2():
        events = []
        return {"progress": events.append, "should_stop": lambda: any(
            e.stage == "protect" and (e.outer or 0) >= 2 for e in events)}  # fmt: skip

    stopped = protect(fast_config(outer_steps=3, state_path=state), **stop_in_step_2())
    assert stopped.cancelled and stopped.steps_done == 1 and (tmp_path / "run.pt").exists()
    other_backdoor = fast_config(outer_steps=3, state_path=state, backdoor="erasure", num_backdoor_images=3)
    assert identity_settings(other_backdoor) == identity_settings(fast_config(outer_steps=3))
    resumed = protect(other_backdoor, resume=True)
    assert resumed.steps_done == 3
    assert protect(fast_config(outer_steps=3, state_path=state), **stop_in_step_2()).steps_done == 1
    with pytest.raises(InputError, match="different run"):
        protect(fast_config(outer_steps=3, state_path=state, beta=5.0), resume=True)


def test_a_method_brings_its_settings_to_every_front_end():
    """The settings' group and help text reach the CLI flags, the page groups and the node tooltips."""
    from apdm_core.cli import build_parser
    from apdm_core.configio import field_help
    from apdm_core.methods import METHODS
    from apdm_core.ui.forms import GROUP_TITLES

    help_text = build_parser()._subparsers._group_actions[0].choices["protect"].format_help()
    assert "--backdoor" in help_text and "persguard options" in help_text
    assert all(name in GROUP_TITLES and entry.title in GROUP_TITLES[name] for name, entry in METHODS.items())
    from nodes.protection import APDMProtectModel

    tip = APDMProtectModel.INPUT_TYPES()["optional"]["backdoor"][1]["tooltip"]
    assert tip == field_help(ProtectConfig, "backdoor")
