import math

import pytest
import torch
from diffusers import DDPMScheduler

from apdm_core.errors import InputError
from apdm_core.losses import (
    dpo_loss,
    naive_adversarial_loss,
    noise_prediction_loss,
    prior_preservation_loss,
    training_target,
)


def test_dpo_value_by_hand():
    # per-sample errors (B=1, one element each) -> d(x+) = 0.2 - 0.5 = -0.3, d(x-) = 0.9 - 0.4 = 0.5
    mp, mn, rp, rn = (torch.tensor([[v]]) for v in (0.2, 0.9, 0.5, 0.4))
    loss, stats = dpo_loss(mp, mn, rp, rn, beta=2.0)
    expected = -math.log(1 / (1 + math.exp(-(-2.0 * (-0.3 - 0.5)))))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["implicit_acc"].item() == 1.0
    assert stats["d_pos"].item() == pytest.approx(-0.3) and stats["d_neg"].item() == pytest.approx(0.5)
    # equal preference -> log 2
    z = torch.zeros(1, 1)
    assert dpo_loss(z, z, z, z)[0].item() == pytest.approx(math.log(2))


def test_dpo_gradient_prefers_the_positive():
    mp = torch.tensor([[0.5]], requires_grad=True)
    mn = torch.tensor([[0.5]], requires_grad=True)
    ref = torch.tensor([[0.5]])
    loss, _ = dpo_loss(mp, mn, ref, ref, beta=1.0)
    loss.backward()
    assert mp.grad.item() > 0  # lowering the error on the positive lowers the loss
    assert mn.grad.item() < 0  # raising the error on the subject lowers the loss
    # and a model that already prefers the positive has a lower loss
    better = dpo_loss(torch.tensor([[0.3]]), torch.tensor([[0.7]]), ref, ref)[0]
    worse = dpo_loss(torch.tensor([[0.7]]), torch.tensor([[0.3]]), ref, ref)[0]
    assert better < loss.detach() < worse


def test_dpo_reductions_differ_and_validate():
    g = torch.Generator().manual_seed(0)
    errs = [torch.rand(2, 4, 3, 3, generator=g) * s for s in (1.0, 3.0, 1.0, 1.0)]
    per_sample = dpo_loss(*errs, beta=5.0, reduction="sample")[0]
    per_element = dpo_loss(*errs, beta=5.0, reduction="element")[0]
    assert not torch.isclose(per_sample, per_element)
    d = (errs[0] - errs[2]).flatten(1).mean(1) - (errs[1] - errs[3]).flatten(1).mean(1)
    assert per_sample.item() == pytest.approx(
        (-torch.nn.functional.logsigmoid(-5.0 * d)).mean().item(), rel=1e-6
    )
    with pytest.raises(InputError):
        dpo_loss(*errs, reduction="batch")


def test_targets_follow_the_scheduler():
    z0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(training_target(eps, z0, noise, t), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    target = training_target(v, z0, noise, t)
    a = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(target, a.sqrt() * noise - (1 - a).sqrt() * z0, atol=1e-6)
    assert not torch.allclose(target, noise)
    odd = DDPMScheduler(prediction_type="epsilon")
    odd.register_to_config(prediction_type="flow")
    with pytest.raises(InputError, match="flow"):
        training_target(odd, z0, noise, t)


def test_simple_losses():
    pred, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    assert noise_prediction_loss(pred, target).item() == 1.0
    assert prior_preservation_loss(pred, target, weight=0.5).item() == 0.5
    assert naive_adversarial_loss(torch.tensor(2.0), torch.tensor(3.0), lam=0.5).item() == pytest.approx(-0.5)
