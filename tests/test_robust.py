"""The levers of protection that holds (README "Protection that holds"): persistent attacker,
sparse and late-weighted protection gradients, the target loss, the utility anchor, lr ranges."""

import copy
import math

import pytest
import torch
from test_protect import make_trainer, params_of

from apdm_core.errors import InputError
from apdm_core.losses import target_loss
from apdm_core.protection import protect


class Spy:
    """A tracker stand-in: records theta' after every inner step."""

    def __init__(self, trainer):
        self.trainer, self.prime = trainer, []

    def update(self, **_):
        self.prime.append(params_of(self.trainer.unet_p))


def test_target_loss_on_hand_made_tensors():
    pred = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    generic = torch.tensor([[0.0, 2.0], [1.0, 1.0]], requires_grad=True)
    loss = target_loss(pred, generic)
    assert float(loss.detach()) == pytest.approx((1 + 0 + 1 + 4) / 4)
    loss.backward()
    assert generic.grad is None  # the frozen model's prediction is a fixed target
    torch.testing.assert_close(pred.grad, torch.tensor([[0.5, 0.0], [-0.5, -1.0]]))


def test_persistent_attacker_continues_and_follows_theta(fast_config):
    trainer = make_trainer(fast_config(resync_every=3, inner_steps=2, outer_steps=5))
    steps_in_episode = []
    for k in range(4):
        theta_before = params_of(trainer.unet)
        spy = Spy(trainer)
        trainer.outer_step(spy)
        steps_in_episode.append(trainer.attacker.current.h)
        delta = [a - b for a, b in zip(trainer.unet.parameters(), theta_before)]
        # theta' after the outer step = theta' after its last attack step + the change of theta
        for p_prime, last, d in zip(trainer.unet_p.parameters(), spy.prime[-1], delta):
            torch.testing.assert_close(p_prime.detach(), last + d, rtol=0, atol=1e-7)
        if k == 0:
            first_end = params_of(trainer.unet_p)
    assert steps_in_episode == [2, 4, 6, 2]  # resynced at outer step 4 (3 % resync_every == 0)
    # in outer step 2 theta' did not restart from theta
    assert not all(torch.equal(a, b) for a, b in zip(first_end, trainer.unet.parameters()))


def reference_weighted_accumulation(trainer):
    """One outer step's accumulated gradient from the definition: every protect_every-th attack step h
    of a fresh episode adds exp(w * (h - H)) * grad L_protect(theta'_h), clipping as configured."""
    cfg = trainer.cfg
    g0 = trainer.generator.get_state()
    unet = copy.deepcopy(trainer.unet)
    params = list(unet.parameters())
    opt = trainer.weights.adamw(params, cfg.lr_personalize)
    total = [torch.zeros_like(p) for p in params]
    horizon = cfg.resync_every * cfg.inner_steps
    for h in range(1, cfg.inner_steps + 1):
        opt.zero_grad(set_to_none=True)
        trainer.personalization_loss(unet).backward()
        if cfg.inner_max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.inner_max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if h % cfg.protect_every == 0:
            trainer.protection_loss(unet)[0].backward()
            w = math.exp(cfg.late_weighting * (h - horizon))
            for t, p in zip(total, params):
                t.add_(w * p.grad)
    trainer.generator.set_state(g0)
    return total


@pytest.mark.parametrize("loss", ["dpo", "target"])
def test_sparse_late_weighted_accumulation_matches_its_definition(fast_config, loss):
    trainer = make_trainer(fast_config(loss=loss, inner_steps=4, protect_every=2, late_weighting=0.5,
                                       resync_every=2, inner_max_grad_norm=0.01, inner_batch_size=2))  # fmt: skip
    expected = reference_weighted_accumulation(trainer)
    evaluations = []
    real = trainer.protection_loss
    trainer.protection_loss = lambda unet: evaluations.append(1) or real(unet)
    trainer.outer_step()
    assert len(evaluations) == 2
    for a, e in zip(trainer.accum, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-7)


def test_persistent_resume_equals_an_uninterrupted_run(fast_config, tmp_path):
    settings = dict(outer_steps=5, inner_steps=2, resync_every=3, lr_personalize_max=1e-3, loss="target",
                    inner_batch_sizes=[1, 2])  # fmt: skip
    full = protect(fast_config(state_path=str(tmp_path / "a.pt"), **settings))
    events = []
    config = fast_config(state_path=str(tmp_path / "b.pt"), **settings)
    in_protect = lambda: sum(e.stage == "protect" for e in events)  # noqa: E731
    stopped = protect(
        config, progress=events.append, should_stop=lambda: in_protect() >= 5
    )  # mid outer step 3
    assert stopped.cancelled and stopped.steps_done == 2
    resumed = protect(config, resume=True)
    assert resumed.steps_done == 5
    for a, b in zip(full.model.unet.state_dict().values(), resumed.model.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["attack_lr"] for h in full.history] == [h["attack_lr"] for h in resumed.history]
    assert [h["attack_batch"] for h in full.history] == [h["attack_batch"] for h in resumed.history]


def test_attacker_learning_rate_range(fast_config):
    result = protect(fast_config(outer_steps=6, inner_steps=1, resync_every=2, lr_personalize=1e-4,
                                 lr_personalize_max=1e-2))  # fmt: skip
    lrs = [h["attack_lr"] for h in result.history]
    assert lrs[0] == lrs[1] and lrs[2] == lrs[3] and lrs[4] == lrs[5]  # one lr per episode
    assert len(set(lrs)) == 3 and all(1e-4 <= v <= 1e-2 for v in lrs)


def test_attacker_batch_size_drawn_per_episode(fast_config, monkeypatch):
    """inner_batch_sizes: one batch size per episode, drawn from the list, and the attack steps use it."""
    import apdm_core.l2p.trainer as trainer_module

    used = []
    real = trainer_module.dreambooth_loss
    monkeypatch.setattr(trainer_module, "dreambooth_loss", lambda *a, **k: used.append(a[6]) or real(*a, **k))
    result = protect(fast_config(outer_steps=8, inner_steps=1, resync_every=2, inner_batch_sizes=[1, 3]))
    batches = [h["attack_batch"] for h in result.history]
    assert all(batches[i] == batches[i + 1] for i in range(0, 8, 2))  # one per episode
    assert set(batches) == {1, 3}
    assert used == batches  # one attack step per outer step, with its episode's batch
    assert "attack_batch" not in protect(fast_config(outer_steps=1)).history[0]
    with pytest.raises(InputError, match="inner_batch_sizes"):
        fast_config(inner_batch_sizes=[2, 0])


def test_target_loss_is_zero_where_the_prompts_coincide(fast_config):
    """At theta itself (no simulated attack) with instance prompt == class prompt, the attacked model
    already predicts what the original predicts for the class: the target loss is exactly 0."""
    cfg = fast_config(loss="target", inner_steps=0, prior_weight=0, outer_steps=1,
                      instance_prompt="a photo of dog", class_prompt="a photo of dog")  # fmt: skip
    assert protect(cfg).history[0]["loss_protect"] < 1e-10  # rounding only; other prompts give ~1e-2


def test_anchor_keeps_theta_near_the_original(fast_config, monkeypatch):
    import apdm_core.pairs as pairs

    calls = []
    real = pairs.sample_images
    monkeypatch.setattr(pairs, "sample_images", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    prompts = ["a photo of cat", "a photo of car"]
    common = dict(outer_steps=4, lr_protect=3e-3, loss="target")
    free = protect(fast_config(**common))
    assert not any(p in prompts for p in calls)  # no anchor images without an anchor
    anchored = protect(fast_config(anchor_weight=50.0, anchor_prompts=prompts, num_anchor_images=2, **common))
    assert set(prompts) <= set(calls)
    anchor = [h["anchor"] for h in anchored.history]
    assert anchor[0] == 0.0 and all(a > 0 for a in anchor[1:])  # theta == the original at the first step
    base = make_trainer(fast_config()).model.unet

    def distance(unet):
        return sum(float((a - b).pow(2).sum()) for a, b in zip(unet.parameters(), base.parameters())) ** 0.5

    assert distance(anchored.model.unet) < distance(free.model.unet)


def test_anchor_unconditional_adds_the_empty_prompt(fast_config, monkeypatch):
    """The flag is the empty prompt appended to the anchor prompts: its images are generated and
    distilled like theirs (and the run is the same as with the prompt written out)."""
    import apdm_core.pairs as pairs

    calls = []
    real = pairs.sample_images
    monkeypatch.setattr(pairs, "sample_images", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    common = dict(outer_steps=3, loss="target", anchor_weight=1.0, num_anchor_images=2)
    plain = protect(fast_config(anchor_prompts=["a photo of cat"], **common))
    assert "" not in calls
    flag = protect(fast_config(anchor_prompts=["a photo of cat"], anchor_unconditional=True, **common))
    assert "" in calls
    written = protect(fast_config(anchor_prompts=["a photo of cat", ""], **common))
    assert [h["anchor"] for h in flag.history] == [h["anchor"] for h in written.history]
    assert [h["anchor"] for h in flag.history] != [h["anchor"] for h in plain.history]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"protect_every": 3, "inner_steps": 2}, "protect_every"),
        ({"inner_max_grad_norm": 1.0, "optimizer_in_backward": True}, "inner_max_grad_norm"),
        ({"anchor_weight": 1.0, "offload_outer": True}, "offload_outer"),
        ({"resync_every": 0}, "resync_every"),
        ({"protect_layers": "attention", "attacker_layers": "cross_attention"}, "widen attacker_layers"),
    ],
)
def test_bad_combinations_are_refused(fast_config, overrides, message):
    with pytest.raises(InputError, match=message):
        protect(fast_config(**overrides))


def test_extra_identifiers_take_turns_in_the_attacker_episodes(fast_config):
    from apdm_core.l2p import identifier_prompts

    cfg = fast_config(outer_steps=8, inner_steps=1, extra_identifiers=["zwx", "qpv"],
                      instance_prompt="a photo of sks dog", class_prompt="a photo of dog")  # fmt: skip
    assert identifier_prompts(cfg) == ["a photo of zwx dog", "a photo of qpv dog"]
    used = {h["identifier"] for h in protect(cfg).history}
    assert used == {"a photo of sks dog", "a photo of zwx dog", "a photo of qpv dog"}
    with pytest.raises(InputError, match="exactly one word"):
        protect(fast_config(extra_identifiers=["zwx"], instance_prompt="a photo of sks red dog",
                            class_prompt="a photo of dog"))  # fmt: skip


# --- the attacker family: LoRA episodes -----------------------------------------------------------
def test_the_attacker_family_takes_turns_and_lora_trains_only_its_adapters(fast_config):
    trainer = make_trainer(fast_config(attacker_family=["full", "lora"], resync_every=2, inner_steps=2,
                                       outer_steps=6, lora_ranks=[2], lora_lr=1e-3, loss="target"))  # fmt: skip
    kinds = []
    for _ in range(6):
        theta = params_of(trainer.unet)
        trainer.outer_step()
        kinds.append(trainer.history[-1]["attacker"])
        ep = trainer.attacker.current
        if ep.lora is not None:
            # theta' is theta (moved by the outer update only); the adapters learned, B no longer zero
            for p_prime, p in zip(trainer.unet_p.parameters(), trainer.unet.parameters()):
                torch.testing.assert_close(p_prime.detach(), p.detach(), rtol=0, atol=1e-7)
            assert any(float(b.abs().max()) > 0 for b in ep.lora.params[1::2])
            assert any(not torch.equal(a, b) for a, b in zip(theta, trainer.unet.parameters()))
    assert kinds == ["full", "full", "lora-r2", "lora-r2", "full", "full"]
    assert trainer.attacker.current.lora is None
    n_hooks = sum(len(m._forward_hooks) for m in trainer.unet_p.modules())
    assert n_hooks == 0  # a finished LoRA episode leaves no hook behind


def test_the_protection_gradient_at_adapted_weights_is_the_gradient_at_the_merged_weights(fast_config):
    """First order: grad_W L(W + B A) = grad of L at the merged weights, applied to W."""
    from apdm_core.l2p.episode import LoRAAdapters

    trainer = make_trainer(fast_config(loss="target"))
    unet = trainer.unet_p
    lora = LoRAAdapters(unet, 2, torch.device("cpu"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in lora.params[1::2]:
            b.normal_(0, 0.1)
    g0 = trainer.generator.get_state()
    trainer.weights.clear_prime_grads()
    trainer.protection_loss(unet)[0].backward()
    adapted = {n: p.grad.clone() for n, p in unet.named_parameters()}
    merged = copy.deepcopy(unet)
    lora.remove()
    layers = [m for n, m in merged.named_modules() if isinstance(m, torch.nn.Linear) and (".attn1." in n
              or ".attn2." in n) and n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]  # fmt: skip
    with torch.no_grad():
        for m, (a, b) in zip(layers, zip(lora.params[0::2], lora.params[1::2])):
            m.weight += b @ a
    for m in merged.modules():
        m._forward_hooks.clear()
    trainer.generator.set_state(g0)
    merged.zero_grad(set_to_none=True)
    trainer.protection_loss(merged)[0].backward()
    for n, p in merged.named_parameters():
        torch.testing.assert_close(adapted[n], p.grad, rtol=1e-4, atol=1e-7)


def test_a_run_stopped_inside_a_lora_episode_resumes_exactly(fast_config, tmp_path):
    settings = dict(outer_steps=6, inner_steps=2, resync_every=2, attacker_family=["lora", "full"],
                    lora_ranks=[2, 3], lora_lr=1e-3, lora_lr_max=4e-3, loss="target")  # fmt: skip
    full = protect(fast_config(state_path=str(tmp_path / "a.pt"), **settings))
    events = []
    config = fast_config(state_path=str(tmp_path / "b.pt"), **settings)
    in_protect = lambda: sum(e.stage == "protect" for e in events)  # noqa: E731
    stopped = protect(config, progress=events.append, should_stop=lambda: in_protect() >= 3)  # outer step 2
    assert stopped.cancelled and stopped.steps_done == 1
    resumed = protect(config, resume=True)
    assert resumed.steps_done == 6
    for a, b in zip(full.model.unet.state_dict().values(), resumed.model.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["attacker"] for h in full.history] == [h["attacker"] for h in resumed.history]
    assert {h["attacker"] for h in full.history} >= {"full"} and any(
        h["attacker"].startswith("lora") for h in full.history
    )


def test_the_null_space_edit_keeps_the_class_prompts_keys_and_values(fast_config):
    """With null_space, no change of a cross-attention to_k / to_v weight has a component along the kept
    span of the class prompt's token embeddings: those keys and values stay as they were (what can move is
    the energy share left out), and nothing but to_k / to_v changes with protect_layers='cross_attention_kv'."""
    from apdm_core.l2p.nullspace import kept_basis

    cfg = fast_config(protect_layers="cross_attention_kv", null_space=0.99, loss="target", outer_steps=2,
                      lr_protect=1e-2)  # fmt: skip
    trainer = make_trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.unet.named_parameters()}
    for _ in range(2):
        trainer.outer_step()
    tokens = trainer.data.class_embeds[0].double()
    basis = kept_basis(tokens, 0.99)
    kept = tokens @ basis.T @ basis  # the class tokens' part inside the kept span
    assert (
        basis.shape[0] < tokens.shape[-1] and float((tokens - kept).norm() ** 2 / tokens.norm() ** 2) <= 0.01
    )
    kv = 0
    for n, p in trainer.unet.named_parameters():
        dw = (p.detach() - before[n]).double()
        if n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")):
            kv += 1
            assert float(dw.abs().max()) > 0, n
            assert float((kept @ dw.T).abs().max()) <= 1e-5 * float(dw.abs().max()) * tokens.abs().max(), n
        else:
            assert torch.equal(dw, torch.zeros_like(dw)), n  # nothing else changes
    assert kv > 0


def test_an_attacker_on_fewer_layers_trains_and_accumulates_only_those(fast_config):
    """attacker_layers (memory for large models): theta' changes only in the attacker's layers, the
    accumulator and the attacker's optimizer hold those layers only; theta moves in protect_layers."""
    cfg = fast_config(
        attacker_layers="attention", protect_layers="cross_attention", inner_steps=2, outer_steps=2
    )
    trainer = make_trainer(cfg)
    names = [n for n, _ in trainer.unet_p.named_parameters()]
    base = {n: p.detach().clone() for n, p in trainer.unet_p.named_parameters()}
    theta0 = {n: p.detach().clone() for n, p in trainer.unet.named_parameters()}
    attention = [n for n in names if ".attn1." in n or ".attn2." in n]
    assert len(trainer.accum) == len(trainer.weights.params_p) == len(attention) < len(names)
    trainer.outer_step()
    moved = {n for n, p in trainer.unet_p.named_parameters() if not torch.equal(p, base[n])}
    assert moved and moved <= set(attention)
    theta_moved = {n for n, p in trainer.unet.named_parameters() if not torch.equal(p, theta0[n])}
    assert theta_moved and all(".attn2." in n for n in theta_moved)


def test_the_conflict_term_is_the_gradient_of_the_cosine_of_two_attack_gradients(fast_config):
    """conflict_weight w: after the attack steps, the accumulator gains w * grad cos(g1, g2), g1 and g2 the
    attacker's own gradients (all of theta') on two independent batches, at theta' as the steps left it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    trainer = make_trainer(fast_config(loss="target", inner_steps=2, conflict_weight=0.5))
    seen = {}
    real = trainer.conflict_gradient

    def spy(log):
        seen.update(rng=trainer.generator.get_state(), before=[a.clone() for a in trainer.accum],
                    unet=copy.deepcopy(trainer.unet_p))  # fmt: skip
        real(log)
        seen["after"] = [a.clone() for a in trainer.accum]

    trainer.conflict_gradient = spy
    entry = trainer.outer_step()
    unet = seen["unet"]
    params = [p for p in unet.parameters() if p.requires_grad]
    trainer.generator.set_state(seen["rng"])
    with sdpa_kernel(SDPBackend.MATH):
        g = [torch.cat([x.reshape(-1) for x in torch.autograd.grad(trainer.personalization_loss(unet), params,
                                                                   create_graph=True)]) for _ in range(2)]  # fmt: skip
        cos = torch.nn.functional.cosine_similarity(g[0], g[1], dim=0)
        expected = torch.autograd.grad(0.5 * cos, params)
    assert entry["conflict"] == pytest.approx(float(cos.detach()), rel=1e-4)
    assert -1 < entry["conflict"] < 1
    for b, a, e in zip(seen["before"], seen["after"], expected):
        torch.testing.assert_close(a - b, e, rtol=1e-3, atol=1e-6)
    assert any(float(e.abs().max()) > 0 for e in expected)


def test_the_conflict_term_of_a_lora_episode_takes_the_adapters_gradients(fast_config, monkeypatch):
    trainer = make_trainer(fast_config(loss="target", inner_steps=2, conflict_weight=0.5,
                                       attacker_family=["lora"], lora_ranks=[2], lora_lr=1e-3, resync_every=2))  # fmt: skip
    asked = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda out, inputs, **k: asked.append(list(inputs))
                        or real(out, inputs, **k))  # fmt: skip
    entry = trainer.outer_step()
    adapters = trainer.attacker.current.lora.params
    assert len(asked) == 2 and all(len(a) == len(adapters) and all(x is y for x, y in zip(a, adapters))
                                   for a in asked)  # fmt: skip
    assert math.isfinite(entry["conflict"])


def test_the_conflict_term_runs_in_one_process_only(fast_config):
    from types import SimpleNamespace

    from apdm_core.l2p import check_parallel

    with pytest.raises(InputError, match="conflict_weight"):
        check_parallel(fast_config(conflict_weight=0.1), SimpleNamespace(active=True, kind="ddp"))
    check_parallel(fast_config(conflict_weight=0.1), SimpleNamespace(active=False, kind="no"))


def test_the_trap_pulls_the_attacked_model_off_the_original_more_the_further_it_walked(fast_config):
    """trap_weight w: after the attack steps of an outer step, the accumulator gains w * h/H * grad of
    ||eps_theta' + eps_ref||^2 on anchor images, h of H attack steps into the episode, at theta' as the steps
    left it; it needs the anchor's images."""
    cfg = fast_config(loss="target", inner_steps=2, resync_every=2, anchor_weight=1.0, num_anchor_images=2,
                      trap_weight=0.5)  # fmt: skip
    trainer = make_trainer(cfg)
    seen = {}
    real = trainer.trap_gradient

    def spy(log, h):
        seen.update(rng=trainer.generator.get_state(), before=[a.clone() for a in trainer.accum], h=h,
                    unet=copy.deepcopy(trainer.unet_p))  # fmt: skip
        real(log, h)
        seen["after"] = [a.clone() for a in trainer.accum]

    trainer.trap_gradient = spy
    trainer.outer_step()
    assert seen["h"] == 2  # 2 of the episode's 4 attack steps: half the weight
    unet, d = seen["unet"], trainer.data
    trainer.generator.set_state(seen["rng"])
    z0, embeds = d.anchor.draw(16, trainer.generator)
    batch = d.diffusion.noisy(z0, embeds, trainer.generator)
    with torch.no_grad():
        ref = trainer.forward_ref(trainer.run_ref, batch)
    params = [p for p in unet.parameters() if p.requires_grad]
    loss = (trainer.forward(unet, batch).float() + ref.float()).pow(2).mean()
    expected = torch.autograd.grad(0.5 * 0.5 * loss, params)
    for b, a, e in zip(seen["before"], seen["after"], expected):
        torch.testing.assert_close(a - b, e, rtol=1e-3, atol=1e-7)
    assert any(float(e.abs().max()) > 0 for e in expected)
    assert trainer.history[-1]["trap"] == pytest.approx(float(loss.detach()), rel=1e-4)
    with pytest.raises(InputError, match="anchor_weight"):
        fast_config(trap_weight=0.5).validate()


def test_tail_average_exports_the_mean_of_the_last_thetas_and_keeps_theta_in_the_state(fast_config, tmp_path):
    """tail_average k: the exported UNet's protected weights are the mean of theta after each of the last k
    outer steps (the others as they were); the run itself is unchanged and its state file keeps theta."""
    settings = dict(outer_steps=4, inner_steps=1, resync_every=2, loss="target")
    trainer = make_trainer(fast_config(tail_average=3, **settings))
    plain = make_trainer(fast_config(**settings))
    thetas = []
    for _ in range(4):
        trainer.outer_step()
        plain.outer_step()
        thetas.append(params_of(trainer.unet))
    for a, b in zip(thetas[-1], plain.unet.parameters()):
        assert torch.equal(a, b.detach())  # averaging does not change the run
    assert trainer.tail_count == 3
    theta = {k: v.clone() for k, v in trainer.state_dict()["unet"].items()}
    exported = trainer.finish()
    moved = 0
    for (name, p), *after in zip(exported.named_parameters(), *thetas):
        expected = (after[1] + after[2] + after[3]) / 3
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
        moved += not torch.equal(after[1], after[3])
        assert torch.equal(trainer.state_dict()["unet"][name], theta[name])  # theta, not the mean
    assert moved  # the last thetas differ: the mean is not one of them


def test_tail_average_resumes_exactly_and_refuses_a_moved_window(fast_config, tmp_path):
    settings = dict(outer_steps=5, inner_steps=2, resync_every=2, loss="target", tail_average=3)
    full = protect(fast_config(state_path=str(tmp_path / "a.pt"), **settings))
    events = []
    config = fast_config(state_path=str(tmp_path / "b.pt"), **settings)
    in_protect = lambda: sum(e.stage == "protect" for e in events)  # noqa: E731
    stopped = protect(config, progress=events.append, should_stop=lambda: in_protect() >= 9)  # in step 5
    assert stopped.cancelled and stopped.steps_done == 4  # 2 of the tail's 3 thetas summed
    resumed = protect(config, resume=True)
    for a, b in zip(full.model.unet.state_dict().values(), resumed.model.unet.state_dict().values()):
        assert torch.equal(a, b)
    stopped = protect(config, progress=events.append, should_stop=lambda: in_protect() >= 18, restart=True)
    assert stopped.steps_done == 4
    with pytest.raises(InputError, match="outer_steps"):  # the window would start at step 3, already passed
        protect(fast_config(state_path=str(tmp_path / "b.pt"), **{**settings, "outer_steps": 6}), resume=True)
    with pytest.raises(InputError, match="tail_average"):
        fast_config(tail_average=6, outer_steps=5).validate()
    from types import SimpleNamespace

    from apdm_core.l2p.placement import check_parallel

    with pytest.raises(InputError, match="fsdp"):  # shards: no whole weights to average
        check_parallel(fast_config(tail_average=2), SimpleNamespace(active=True, kind="fsdp"))
    check_parallel(fast_config(tail_average=2), SimpleNamespace(active=True, kind="ddp"))


def test_protect_beta1_sets_the_outer_momentum_only(fast_config):
    """protect_beta1: the protection's AdamW takes it as beta1; the simulated attacker keeps adam_beta1; 0 = as before."""
    trainer = make_trainer(fast_config(loss="target", protect_beta1=0.99, resync_every=2))
    assert trainer.optimizer.param_groups[0]["betas"] == (0.99, trainer.cfg.adam_beta2)
    trainer.outer_step()
    assert trainer.attacker.current.opt.param_groups[0]["betas"][0] == trainer.cfg.adam_beta1 != 0.99
    plain = make_trainer(fast_config(loss="target", resync_every=2))
    assert plain.optimizer.param_groups[0]["betas"] == (plain.cfg.adam_beta1, plain.cfg.adam_beta2)
    plain.outer_step()
    assert all(torch.equal(a, b) for a, b in zip(trainer.accum, plain.accum))  # the same first gradient
    trainer.outer_step()  # (Adam's bias-corrected first step does not depend on beta1; the second does)
    plain.outer_step()
    moved = max(
        float((a - b).abs().max()) for a, b in zip(trainer.unet.parameters(), plain.unet.parameters())
    )
    # well above float32 rounding of these weights (< 1e-7); the steps differ by ~5% of lr
    assert moved > 1e-6
    for bad in (1.0, -0.1):
        with pytest.raises(InputError, match="protect_beta1"):
            fast_config(protect_beta1=bad).validate()


def test_sam_radius_takes_the_protection_gradient_at_the_ascent_point_and_restores_theta_prime(fast_config):
    """sam_radius rho: the accumulator gains grad L_protect at theta' + rho ||theta'|| g / ||g|| (g the gradient at
    theta', the same noise and timesteps), computed here on a copy; theta' itself is left as it was."""
    trainer = make_trainer(fast_config(loss="target", inner_steps=2, protect_every=2, sam_radius=0.01))
    seen = {}
    real = trainer.protection_gradient

    def spy(log, where, weight=1.0):
        seen.update(rng=trainer.generator.get_state(), before=[a.clone() for a in trainer.accum],
                    unet=copy.deepcopy(trainer.unet_p), prime=params_of(trainer.unet_p))  # fmt: skip
        real(log, where, weight)
        seen.update(after=[a.clone() for a in trainer.accum], prime_after=params_of(trainer.unet_p))

    trainer.protection_gradient = spy
    trainer.outer_step()
    assert all(torch.equal(a, b) for a, b in zip(seen["prime"], seen["prime_after"]))  # theta' restored
    unet = seen["unet"]
    params = [p for p in unet.parameters() if p.requires_grad]
    trainer.generator.set_state(seen["rng"])
    g = torch.autograd.grad(trainer.protection_loss(unet)[0], params, allow_unused=True)
    pairs = [(p, d) for p, d in zip(params, g) if d is not None]
    g_norm = math.sqrt(sum(float(d.square().sum()) for _, d in pairs))
    p_norm = math.sqrt(sum(float(p.detach().square().sum()) for p, _ in pairs))
    with torch.no_grad():
        for p, d in pairs:
            p.add_(d, alpha=0.01 * p_norm / g_norm)
    trainer.generator.set_state(seen["rng"])
    expected = torch.autograd.grad(trainer.protection_loss(unet)[0], params, allow_unused=True)
    differs = 0.0
    for b, a, e, f in zip(seen["before"], seen["after"], expected, g):
        if e is None:
            continue
        torch.testing.assert_close(a - b, e, rtol=1e-3, atol=1e-7)
        differs = max(differs, float((e - f).abs().max()))
    assert differs > 0  # (sanity of the check: the ascent point's gradient is not theta''s)
    assert trainer.history[-1]["sam_step"] == pytest.approx(0.01 * p_norm, rel=1e-3)
    with pytest.raises(InputError, match="sam_radius"):
        fast_config(sam_radius=-0.1).validate()


def test_sam_weights_others_moves_only_the_weights_outside_protect_layers(fast_config):
    """sam_weights='others': the ascent step leaves theta''s protected weights (their theta' copies) where they are
    and moves the others by sam_radius of their own norm; it needs a protect_layers that leaves some out."""
    trainer = make_trainer(fast_config(loss="target", inner_steps=1, protect_layers="cross_attention",
                                       sam_radius=0.01, sam_weights="others"))  # fmt: skip
    protected = {id(p) for _, p in trainer.weights.protected_pairs}
    moved = {}
    real = trainer.protection_term

    def spy(unet, log, where, weight=1.0):  # called at the ascent point
        for name, p in trainer.unet_p.named_parameters():
            moved[name] = (id(p) in protected, float((p.detach() - before[name]).abs().max()))
        return real(unet, log, where, weight)

    before = {}
    trainer.protection_term = spy
    real_gradient = trainer.protection_gradient

    def gradient(log, where, weight=1.0):
        before.update({n: p.detach().clone() for n, p in trainer.unet_p.named_parameters()})
        real_gradient(log, where, weight)

    trainer.protection_gradient = gradient
    trainer.outer_step()
    assert any(is_protected for is_protected, _ in moved.values())
    assert all(delta == 0 for is_protected, delta in moved.values() if is_protected)
    assert max(delta for is_protected, delta in moved.values() if not is_protected) > 0
    with pytest.raises(InputError, match="sam_weights"):
        fast_config(sam_radius=0.01, sam_weights="others").validate()  # protect_layers 'all'
