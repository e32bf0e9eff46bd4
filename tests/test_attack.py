"""Attacks on the tiny model: each changes exactly what it should, resumes, cancels, saves and reloads."""

import copy

import pytest
import torch
from helpers import draw_photo

from apdm_core.attack import AttackConfig, AugmentedBank, load_attack_output, run_attack
from apdm_core.errors import InputError
from apdm_core.loading import load_model
from apdm_core.training import Diffusion, LatentBank, dreambooth_loss, make_forward


@pytest.fixture()
def attack_config(tmp_path):
    def make(**overrides) -> AttackConfig:
        values = dict(steps=2, num_class_images=2, sample_steps=2, guidance_scale=2.0, lr=1e-3, device="cpu",
                      cache_dir=str(tmp_path / "cache"), save_every=0)  # fmt: skip
        values.update(overrides)
        return AttackConfig(**values)

    return make


@pytest.fixture()
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module) -> set[str]:
    return {k for k, v in module.state_dict().items() if k in before and not torch.equal(before[k], v)}


def test_dreambooth_fine_tunes_the_unet_only(model, subject_dir, attack_config):
    unet0, te0, vae0 = snapshot(model.unet), snapshot(model.text_encoder), snapshot(model.vae)
    result = run_attack(model, subject_dir, attack_config(kind="dreambooth"))
    assert result.steps_done == 2 and not result.cancelled and len(result.losses) == 2
    assert result.model.unet is not model.unet
    assert len(changed(unet0, result.model.unet)) > 0.8 * len(
        unet0
    )  # a full fine-tune moves (almost) everything
    assert not changed(unet0, model.unet)  # the input model object is untouched
    assert not changed(te0, result.model.text_encoder) and not changed(vae0, result.model.vae)
    assert result.config.lr == 1e-3 and result.config.prior_weight == 1.0  # resolved


def test_lora_trains_only_the_adapters(model, subject_dir, attack_config):
    unet0 = snapshot(model.unet)
    result = run_attack(model, subject_dir, attack_config(kind="lora", lora_rank=2, lora_alpha=2.0))
    state = result.model.unet.state_dict()
    lora_keys = {k for k in state if "lora_" in k}
    assert lora_keys and all(
        ".to_q." in k or ".to_k." in k or ".to_v." in k or ".to_out.0." in k for k in lora_keys
    )
    for k, v in state.items():  # every base weight (under peft's base_layer name) equals the original
        if "lora_" not in k:
            assert torch.equal(v, unet0[k.replace(".base_layer", "")]), k
    assert any(state[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)  # B starts at 0 and moved
    assert not changed(unet0, model.unet) and not any("lora" in k for k in model.unet.state_dict())


def test_textual_inversion_changes_one_embedding_row(model, subject_dir, attack_config):
    table0 = model.text_encoder.get_input_embeddings().weight.detach().clone()
    n_tokens, unet0 = len(model.tokenizer), snapshot(model.unet)
    result = run_attack(model, subject_dir, attack_config(kind="textual_inversion", steps=3, lr=5e-2))
    table = result.model.text_encoder.get_input_embeddings().weight
    assert table.shape[0] == table0.shape[0] + 1
    assert torch.equal(table[: table0.shape[0]], table0)  # every existing row is unchanged
    token_id = result.model.tokenizer.convert_tokens_to_ids("<sks>")
    init_id = model.tokenizer("person", add_special_tokens=False).input_ids[0]
    assert token_id == table0.shape[0] and not torch.equal(table[token_id], table0[init_id])
    assert result.model.unet is model.unet and not changed(unet0, model.unet)  # the UNet is shared and frozen
    assert (
        len(model.tokenizer) == n_tokens
        and model.text_encoder.get_input_embeddings().weight.shape == table0.shape
    )
    assert result.prompt("a portrait of sks person") == "a portrait of <sks> person"
    assert result.config.prior_weight == 0.0  # TI has no prior preservation by default


def test_the_real_attack_computes_the_simulated_attackers_objective(model, subject_dir, attack_config):
    """Without augmentation and clipping, 2 attack steps = 2 steps of training.dreambooth_loss + AdamW."""
    cfg = attack_config(kind="dreambooth", max_grad_norm=0.0, lr=1e-4)
    result = run_attack(model, subject_dir, cfg)
    from apdm_core.data import load_subject_images
    from apdm_core.pairs import ensure_class_images

    size = model.native_resolution
    subjects = [s.image for s in load_subject_images(subject_dir, size)]
    classes = ensure_class_images(model, cfg.class_prompt, 2, size=size, steps=2, guidance=2.0,
                                  cache_dir=cfg.cache_dir)  # fmt: skip
    instance, prior = LatentBank(*model.encode_images(subjects)), LatentBank(*model.encode_images(classes))
    embeds = model.encode_prompts([cfg.instance_prompt, cfg.class_prompt])
    unet = copy.deepcopy(model.unet).requires_grad_(True).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    g = torch.Generator("cpu").manual_seed(cfg.seed)
    diffusion, forward = Diffusion(model.noise_scheduler()), make_forward(torch.device("cpu"))
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = dreambooth_loss(unet, forward, diffusion, instance, embeds[:1], g, 1, prior, embeds[1:], 1.0)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses == result.losses
    for a, b in zip(unet.parameters(), result.model.unet.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_augmentation_draws_fresh_views_reproducibly(model, subject_dir, attack_config):
    cfg = attack_config(kind="lora", crop_scale=1.25, random_flip=True, steps=3)
    a, b = run_attack(model, subject_dir, cfg), run_attack(model, subject_dir, cfg)
    assert a.losses == b.losses  # one explicit generator: the same views, noise and timesteps
    assert a.losses != run_attack(model, subject_dir, cfg.replace(crop_scale=1.0, random_flip=False)).losses
    bank = AugmentedBank(model, [draw_photo(0)], model.native_resolution, True, 1.25, True)
    g = torch.Generator("cpu").manual_seed(0)
    z1, z2 = bank.draw(2, g), bank.draw(2, g)
    assert z1.shape == (2, 4, 8, 8) and not torch.equal(z1, z2)


def test_resume_equals_an_uninterrupted_attack(model, subject_dir, attack_config, tmp_path):
    cfg = attack_config(kind="lora", steps=4, random_flip=True)
    full = run_attack(model, subject_dir, cfg, state_path=tmp_path / "a.pt")
    events = []
    state = tmp_path / "b.pt"
    stopped = run_attack(model, subject_dir, cfg, progress=events.append, state_path=state,
                         should_stop=lambda: sum(e.stage == "attack" for e in events) >= 2)  # fmt: skip
    assert stopped.cancelled and stopped.steps_done == 2 and stopped.state_path == state and state.exists()
    assert [e.step for e in events if e.stage == "attack"] == [1, 2]  # cancelled within one step
    resumed = run_attack(model, subject_dir, cfg, resume=True, state_path=state)
    assert resumed.steps_done == 4 and resumed.losses == full.losses and not state.exists()
    for a, b in zip(full.model.unet.state_dict().values(), resumed.model.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert run_attack(model, subject_dir, cfg, should_stop=lambda: True, state_path=state).steps_done == 0
    with pytest.raises(InputError, match="different attack"):
        run_attack(model, subject_dir, cfg.replace(lr=5e-3), resume=True, state_path=state)


def test_saved_results_reload(model, subject_dir, attack_config, tmp_path):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for kind in ("lora", "textual_inversion", "dreambooth"):
        result = run_attack(model, subject_dir, attack_config(kind=kind))
        out = result.save(tmp_path / kind)
        assert (out / "apdm_attack_config.json").exists() and (out / "attack_history.json").exists()
        with pytest.raises(InputError, match="already exists"):
            result.save(out)
        reloaded, prompt_map, cfg = load_attack_output(load_model(model.source), out)
        assert cfg.kind == kind and prompt_map == result.prompt_map
        prompt = [result.prompt("a photo of sks person")]
        e1, e2 = result.model.encode_prompts(prompt), reloaded.encode_prompts(prompt)
        torch.testing.assert_close(e1, e2)
        with torch.no_grad():
            y1 = result.model.unet(x, torch.tensor([500]), encoder_hidden_states=e1).sample
            y2 = reloaded.unet(x, torch.tensor([500]), encoder_hidden_states=e2).sample
        torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)


def test_config_round_trip_and_validation(tmp_path):
    cfg = AttackConfig(kind="textual_inversion", steps=10, lora_targets=["to_q"], random_crop=False)
    for name in ("a.json", "a.yaml"):
        cfg.save(tmp_path / name)
        assert AttackConfig.load(tmp_path / name) == cfg
    assert cfg.resolved().lr == 5e-3 and cfg.resolved().steps == 10
    assert AttackConfig().resolved().steps == 800 and AttackConfig().resolved().lr == 5e-6
    with pytest.raises(InputError, match="identifier"):
        AttackConfig(identifier="xyz")
    with pytest.raises(InputError, match="not a known attack"):
        AttackConfig(kind="hypernetwork")
    with pytest.raises(InputError, match="crop_scale"):
        AttackConfig(crop_scale=0.5)
    with pytest.raises(InputError, match="Unknown config key"):
        AttackConfig.from_dict({"kind": "lora", "rank": 4})


def test_gradient_checkpointing_computes_the_same_step(model, subject_dir, attack_config):
    cfg = attack_config(kind="lora", steps=2)
    plain, checkpointed = (
        run_attack(model, subject_dir, cfg),
        run_attack(model, subject_dir, cfg.replace(gradient_checkpointing=True)),
    )
    assert checkpointed.model.unet.is_gradient_checkpointing and not model.unet.is_gradient_checkpointing
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


@pytest.mark.parametrize("kind", ["dreambooth", "lora", "textual_inversion"])
def test_attacks_run_when_called_in_inference_mode(model, subject_dir, attack_config, kind):
    """ComfyUI runs node code under torch.inference_mode(): the trainable copies must be normal tensors."""
    with torch.inference_mode():
        result = run_attack(model, subject_dir, attack_config(kind=kind, steps=1))
    assert result.steps_done == 1 and not result.cancelled


def test_snapshots_give_the_model_along_the_attack(tiny_model_dir, subject_dir, tmp_path):
    """One attack run scores every budget of the robustness curve: the model after each listed step."""
    from apdm_core.attack import AttackConfig, run_attack
    from apdm_core.loading import load_model

    model = load_model(tiny_model_dir)
    cfg = AttackConfig(steps=3, lr=1e-3, num_class_images=1, sample_steps=2, cache_dir=str(tmp_path),
                       instance_prompt="a photo of sks dog", class_prompt="a photo of dog", device="cpu",
                       save_every=0)  # fmt: skip
    seen = {}

    def snap(step, view):
        assert not torch.is_grad_enabled()
        seen[step] = {k: v.clone() for k, v in view.unet.state_dict().items()}

    result = run_attack(model, subject_dir, cfg, snapshot_steps=[0, 1, 3], on_snapshot=snap)
    assert sorted(seen) == [0, 1, 3]
    base = model.unet.state_dict()
    assert all(torch.equal(seen[0][k], base[k]) for k in base)  # step 0: before the first step
    final = result.model.unet.state_dict()
    assert all(torch.equal(seen[3][k], final[k]) for k in final)
    assert not all(torch.equal(seen[1][k], final[k]) for k in final)
