"""Performance levers: the fast path computes what the straightforward reference computes, each
lever keeps the losses and updates, the estimates add up. Tiny model, procedural images."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import draw_photo
from perf_tools import (  # benchmarks/, on the path by conftest.py
    UNET_CONFIGS,
    ReferenceL2P,
    count_unet_flops,
    estimate_memory,
    saved_activation_bytes,
)

from apdm_core.config import PRESETS, ProtectConfig
from apdm_core.data import SubjectImage
from apdm_core.errors import InputError
from apdm_core.l2p import L2PTrainer, encode_data
from apdm_core.tiny import build_tiny_model

SIZE = 64  # the tiny model's native resolution


@pytest.fixture(scope="module")
def world():
    """A tiny model and fixed images (no sampling: positives and class images are procedural)."""
    model = build_tiny_model(seed=3)
    subjects = [SubjectImage(f"s{i}", draw_photo(i, SIZE)) for i in range(3)]
    positives = [draw_photo(10 + i, SIZE) for i in range(3)]
    class_images = [draw_photo(20 + i, SIZE) for i in range(2)]
    return model, subjects, positives, class_images


def config(**overrides) -> ProtectConfig:
    values = dict(outer_steps=2, inner_steps=2, lr_protect=1e-5, lr_personalize=1e-5, device="cpu",
                  num_class_images=2, seed=5)  # fmt: skip
    values.update(overrides)
    return ProtectConfig(**values)


def run_fast(world, cfg: ProtectConfig, steps: int = 2) -> L2PTrainer:
    model, subjects, positives, class_images = world
    data = encode_data(cfg, model, subjects, positives, class_images)
    trainer = L2PTrainer(cfg, model, data, torch.device("cpu"))
    for _ in range(steps):
        trainer.outer_step()
    return trainer


def run_reference(world, cfg: ProtectConfig, steps: int = 2) -> ReferenceL2P:
    model, subjects, positives, class_images = world
    ref = ReferenceL2P(cfg, model, subjects, positives, class_images, torch.device("cpu"))
    for _ in range(steps):
        ref.outer_step()
    return ref


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def losses(runner) -> list[float]:
    return [h[k] for h in runner.history for k in ("loss_per", "loss_protect") if h[k] is not None]


def update(runner, model) -> torch.Tensor:
    return flat(runner.unet.parameters()) - flat(model.unet.parameters())


def assert_close_run(a, b, model) -> None:
    """Same computation up to rounding: losses to 1e-6, the accumulated protection gradient to
    1e-4, the update of theta to 1e-2 (AdamW divides by sqrt(v): for gradients near zero its
    update is sign-like, so rounding-level differences grow to a fraction of the step)."""
    assert losses(a) == pytest.approx(losses(b), rel=1e-6)
    assert rel(flat(a.accum), flat(b.accum)) < 1e-4
    assert rel(update(a, model), update(b, model)) < 1e-2


@pytest.mark.parametrize(
    "overrides",
    [{}, {"accumulation": "protect+personalize", "dpo_reduction": "element"}, {"inner_steps": 0}],
    ids=["paper", "released-code", "dpo-only"],
)
def test_fast_path_equals_the_straightforward_reference(world, overrides):
    """The engine (persistent theta', cached encodings, one batched forward per path, gradient
    accumulated by the backward) against the straightforward L2P: same losses and updates."""
    cfg = config(**overrides)
    fast, ref = run_fast(world, cfg), run_reference(world, cfg)
    assert fast.step == ref.step == 2
    assert float(update(ref, world[0]).abs().max()) > 1e-5  # theta moved: the comparison is not vacuous
    assert_close_run(fast, ref, world[0])


# Levers that leave the fp32 arithmetic as it is: the run is bit for bit the same.
EXACT_LEVERS = [
    {"gradient_checkpointing": True},
    {"optimizer_in_backward": True},
    {"optimizer_in_backward": True, "accumulation": "protect+personalize"},
    {"offload_outer": True},
    {"adamw_impl": "loop"},
    {"attention": "xformers"},  # no CUDA here: falls back to SDPA with a warning
]


@pytest.mark.parametrize("lever", EXACT_LEVERS, ids=lambda d: "+".join(f"{k}={v}" for k, v in d.items()))
def test_levers_that_keep_the_arithmetic_give_the_same_run_exactly(world, lever):
    base = run_fast(world, config(accumulation=lever.get("accumulation", "protect")))
    fast = run_fast(world, config(**lever))
    assert losses(fast) == losses(base)
    assert all(torch.equal(a, b) for a, b in zip(fast.unet.parameters(), base.unet.parameters()))
    if lever.get("offload_outer"):
        assert all(p.device.type == "cpu" for p in fast.unet.parameters())


@pytest.mark.parametrize("lever", [{"channels_last": True}, {"adamw_impl": "fused"}], ids=str)
def test_levers_with_other_kernels_give_the_same_run_up_to_rounding(world, lever):
    assert_close_run(run_fast(world, config(**lever)), run_fast(world, config()), world[0])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def assert_same_protection(half, base, model) -> None:
    """Half precision computes the same protection up to rounding, by tolerances that a wrong sign or a
    wrong reference breaks: the DPO term alone moves by ~1e-3 around ln 2, so compare what it is made
    of (d_pos, d_neg: ~-0.004 here, bf16 error ~5e-4; a reference equal to theta gives 0) and the
    direction of the DPO-only gradient and of theta's update (a flipped sign gives about -1)."""
    for hb, hh in zip(base.history, half.history):
        for key in ("d_pos", "d_neg"):
            assert abs(hh[key] - hb[key]) < 1.5e-3 and abs(hb[key]) > 2e-3, (key, hb[key], hh[key])
        assert hh["loss_per"] == pytest.approx(hb["loss_per"], rel=0.02)
    assert cosine(flat(half.accum), flat(base.accum)) > 0.99
    assert cosine(update(half, model), update(base, model)) > 0.95


def test_half_precision_levers_stay_close(world):
    """bf16 autocast and a bf16 reference round differently, but compute the same protection."""
    base = run_fast(world, config(prior_weight=0.0))  # the DPO term alone decides the direction
    half = run_fast(world, config(mixed_precision="bf16", ref_precision="bf16", prior_weight=0.0))
    assert half.ref_unet.dtype == torch.bfloat16 and world[0].unet.dtype == torch.float32
    assert_same_protection(half, base, world[0])


@pytest.mark.parametrize("preset", ["fast", "low-memory", "low-memory-8bit"])
def test_each_performance_preset_computes_the_paper_path(world, preset):
    """A shipped performance preset as a whole (e.g. low-memory: checkpointing + optimizer in the
    backward + offloaded theta + bf16) against the paper's settings computed plainly."""
    if PRESETS[preset].get("optimizer") == "adamw8bit" and not torch.cuda.is_available():
        pytest.skip("adamw8bit runs on CUDA only (bitsandbytes)")
    base = run_fast(world, config(prior_weight=0.0))
    fast = run_fast(world, config(prior_weight=0.0, **PRESETS[preset]))
    assert_same_protection(fast, base, world[0])


def test_input_model_is_never_modified_by_the_levers(world):
    model = world[0]
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    trainer = run_fast(world, config(channels_last=True, ref_precision="bf16"), steps=1)
    unet = trainer.finish()
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    assert all(p.is_contiguous() for p in unet.parameters())  # safetensors-ready
    assert all(p.is_contiguous() for p in model.unet.parameters())


def test_xformers_falls_back_to_sdpa_with_a_warning(world, caplog):
    with caplog.at_level(logging.WARNING, logger="apdm_core.l2p.placement"):
        run_fast(world, config(attention="xformers"), steps=0)
    assert "SDPA" in caplog.text


def test_8bit_adamw_needs_cuda_and_bitsandbytes(world):
    with pytest.raises(InputError, match="adamw8bit.*optimizer='adamw'"):
        run_fast(world, config(optimizer="adamw8bit"), steps=0)


def test_presets_and_flags():
    for name in ("fast", "low-memory", "low-memory-8bit"):
        ProtectConfig.from_preset(name)  # validates
    assert PRESETS["low-memory"]["offload_outer"] and PRESETS["low-memory-8bit"]["optimizer"] == "adamw8bit"
    from apdm_core.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["protect", "--preset", "fast", "--gradient-checkpointing", "--no-channels-last"]
    )
    cfg = config_from_args(args)
    assert cfg.gradient_checkpointing is True and cfg.channels_last is False and cfg.mixed_precision == "bf16"
    with pytest.raises(InputError, match="gradient_checkpointing"):
        ProtectConfig(gradient_checkpointing="yes")


def test_memory_estimate_adds_up():
    n = 10**9
    paper = estimate_memory(n, ProtectConfig())
    # theta', accumulator, gradient, theta, reference: 4 B each; two AdamW: 8 B each
    assert paper.total == 36 * n
    low = estimate_memory(n, ProtectConfig.from_preset("low-memory"))
    assert low.total == (4 + 4 + 8 + 2) * n  # theta', accumulator, attacker AdamW, bf16 reference
    low8 = estimate_memory(n, ProtectConfig.from_preset("low-memory-8bit"), activations=5)
    assert low8.total == (4 + 4 + 2 + 2) * n + 5
    fsdp = estimate_memory(n, ProtectConfig(distributed="fsdp"), processes=4)
    assert fsdp.total == (4 + 4 + 4 + 8 + 4) * n / 4


def test_flops_and_activations_on_the_meta_device():
    from apdm_core.tiny import tiny_configs

    unet = tiny_configs()["unet"]
    fwd = count_unet_flops(unet, 64, batch=1, backward=False)
    both = count_unet_flops(unet, 64, batch=2, backward=True)
    assert fwd > 0 and 2 * 2.5 * fwd < both < 2 * 3.5 * fwd  # backward ~ 2x forward
    full = saved_activation_bytes(unet, 64, 3)
    assert saved_activation_bytes(unet, 64, 3, gradient_checkpointing=True) < full
    assert saved_activation_bytes(unet, 64, 3, torch.bfloat16) < full
    assert set(UNET_CONFIGS) == {"sd15", "sd15-small", "sdxl", "sdxl-small"}
    from perf_tools import estimate_memory, layer_parameter_counts

    from apdm_core.config import ProtectConfig

    xl = UNET_CONFIGS["sdxl"]
    counts = layer_parameter_counts(xl)
    n, attention = counts["all"], counts["attention"]
    assert round(n / 1e6) == 2567 and 0.2 * n < attention < 0.5 * n
    c = ProtectConfig.from_preset("sdxl-24gb")
    est = estimate_memory(n, c, n_attacked=attention, n_protected=counts[c.protect_layers])
    assert (
        est.parts["accumulator"] == 4 * attention and est.parts["theta'"] == 4 * n and est.total < 22 * 2**30
    )
