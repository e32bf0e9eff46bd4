"""hypergradient: the protection gradient through the simulated attacker's unrolled AdamW steps (l2p/unrolled.py)."""

from types import SimpleNamespace

import pytest
import torch
from test_protect import make_trainer

from apdm_core.errors import InputError
from apdm_core.l2p import check_parallel
from apdm_core.protection import protect


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def accumulated(config):
    """(the accumulated protection gradient of one outer step, the trainer)."""
    trainer = make_trainer(config)
    trainer.outer_step()
    return flat(trainer.accum), trainer


def test_with_a_vanishing_attacker_lr_the_hypergradient_is_the_first_order_gradient(fast_config):
    """Through attack steps that do not move theta' the derivative is the gradient at theta' itself: the
    unrolled path differentiates the same losses, at the same draws, with respect to the step's start."""
    settings = dict(loss="target", inner_steps=3, protect_every=1, lr_personalize=1e-12, resync_every=2)
    first, _ = accumulated(fast_config(**settings))
    hyper, _ = accumulated(fast_config(hypergradient=True, **settings))
    assert float(first.norm()) > 0
    torch.testing.assert_close(hyper, first, rtol=1e-3, atol=1e-3 * float(first.abs().max()))


def test_at_the_attackers_lr_the_hypergradient_is_not_the_first_order_gradient(fast_config):
    settings = dict(loss="target", inner_steps=3, protect_every=1, lr_personalize=1e-3, resync_every=2)
    first, _ = accumulated(fast_config(**settings))
    hyper, _ = accumulated(fast_config(hypergradient=True, **settings))
    cos = float(torch.nn.functional.cosine_similarity(first, hyper, dim=0))
    assert cos < 0.99  # the second-order part is there
    assert torch.isfinite(hyper).all() and float(hyper.norm()) > 0


def test_the_unrolled_steps_leave_the_attackers_state_where_the_real_steps_would(fast_config):
    """The episode continues from the unrolled steps: AdamW's moments and step count as torch's AdamW leaves
    them after the same steps at the same draws (the outer update does not touch them)."""
    settings = dict(loss="target", inner_steps=3, lr_personalize=1e-3, resync_every=3, outer_steps=3)
    plain, hyper = (
        make_trainer(fast_config(**settings)),
        make_trainer(fast_config(hypergradient=True, **settings)),
    )
    plain.outer_step()
    hyper.outer_step()
    a, b = plain.attacker.current.opt.state, hyper.attacker.current.opt.state
    for p, q in zip(plain.params_p, hyper.params_p):
        assert float(b[q]["step"]) == float(a[p]["step"]) == 3
        for key in ("exp_avg", "exp_avg_sq"):  # (up to the attention kernel's rounding: math vs the default)
            torch.testing.assert_close(
                b[q][key], a[p][key], rtol=1e-3, atol=1e-3 * float(a[p][key].abs().max())
            )
    # theta' - theta (theta' follows theta's update, which differs): where the attack steps took theta'; a
    # coordinate whose gradient is about 0 may take Adam's (sign-like) step the other way with the other kernel
    d = flat([(q - u) - (p - t) for p, t, q, u in zip(plain.params_p, plain.weights.params, hyper.params_p,
                                                      hyper.weights.params)]).detach().abs()  # fmt: skip
    assert float((d > 1e-6).float().mean()) < 1e-3 and float(d.max()) <= 2 * 1e-3 * 3
    hyper.outer_step()  # the episode goes on from there (theta' then differs: the outer updates differ)
    assert hyper.attacker.current.h == 6
    assert float(hyper.attacker.current.opt.state[hyper.params_p[0]]["step"]) == 6


def test_lora_episodes_keep_the_first_order_gradient(fast_config):
    settings = dict(loss="target", attacker_family=["lora"], lora_ranks=[2], lora_lr=1e-3, resync_every=2)
    first, _ = accumulated(fast_config(**settings))
    hyper, _ = accumulated(fast_config(hypergradient=True, **settings))
    assert torch.equal(first, hyper)


def test_a_hypergradient_run_resumes_exactly(fast_config, tmp_path):
    settings = dict(outer_steps=3, inner_steps=2, resync_every=2, loss="target", hypergradient=True)
    full = protect(fast_config(state_path=str(tmp_path / "a.pt"), **settings))
    events = []
    config = fast_config(state_path=str(tmp_path / "b.pt"), **settings)
    stopped = protect(config, progress=events.append,
                      should_stop=lambda: sum(e.stage == "protect" for e in events) >= 5)  # fmt: skip
    assert stopped.cancelled and stopped.steps_done == 2  # inside the persistent episode's second outer step
    resumed = protect(config, resume=True)
    for a, b in zip(full.model.unet.state_dict().values(), resumed.model.unet.state_dict().values()):
        assert torch.equal(a, b)
    plain = protect(fast_config(**{**settings, "hypergradient": False}))
    assert any(not torch.equal(a, b) for a, b in zip(full.model.unet.state_dict().values(),
                                                     plain.model.unet.state_dict().values()))  # fmt: skip


def test_what_hypergradient_cannot_run_with_is_refused_before_any_work(fast_config):
    for clash in (dict(optimizer_in_backward=True, inner_max_grad_norm=0.0), dict(accumulation="protect+personalize"),
                  dict(inner_steps=0), dict(attention="xformers")):  # fmt: skip
        with pytest.raises(InputError, match="hypergradient"):
            fast_config(hypergradient=True, **clash).validate()
    with pytest.raises(InputError, match="hypergradient"):
        check_parallel(fast_config(hypergradient=True), SimpleNamespace(active=True, kind="ddp"))
    check_parallel(fast_config(hypergradient=True), SimpleNamespace(active=False, kind="no"))


@pytest.mark.parametrize(
    "lever",
    [
        dict(mixed_precision="bf16"),
        dict(gradient_checkpointing=True),
        dict(channels_last=True),
        dict(offload_outer=True),
    ],
)
def test_the_hypergradient_runs_with_the_performance_levers(fast_config, lever):
    """bf16 rounds small gradients to exactly 0, where sqrt's derivative is infinite: the unrolled AdamW's must
    stay finite (it gave NaN before safe_sqrt)."""
    trainer = make_trainer(fast_config(loss="target", hypergradient=True, resync_every=2, **lever))
    trainer.outer_step()
    g = flat(trainer.accum)
    assert torch.isfinite(g).all() and float(g.norm()) > 0
