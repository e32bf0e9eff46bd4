"""Performance tools: the straightforward L2P (baseline and numerical guard), UNet shapes to
benchmark, memory estimates and FLOP counts. Used by ``benchmarks/bench_protect.py`` and the
tests; the protection itself never imports this module.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from apdm_core.config import ProtectConfig
from apdm_core.errors import InputError
from apdm_core.losses import dpo_loss, noise_prediction_loss
from apdm_core.models import SDModel
from apdm_core.sdxl import unet_call
from apdm_core.training import Diffusion, LatentBank, NoisyBatch

# ------------------------------------------------------------------------------------------
# the straightforward implementation
# ------------------------------------------------------------------------------------------


class ReferenceL2P:
    """L2P with the DPO loss written the straightforward way (as the released code does it).

    fp32 everywhere; theta' is a fresh ``deepcopy`` of theta at every outer step, beside theta and
    the frozen fp32 original (three full copies) and a fresh inner AdamW; the fixed images go
    through the VAE and the prompts through the text encoder again at every inner step; every
    term (instance, class, positive, negative, and the two reference terms) has its own UNet
    forward; gradients are copied out of ``.grad`` after separate backwards.

    It draws the same random numbers in the same order as ``protect.L2PTrainer``, so both compute
    the same losses and the same update of theta (up to the rounding of batched forwards): the
    benchmark's speed-up is a ratio between two computations of the same thing.
    """

    def __init__(
        self,
        config: ProtectConfig,
        model: SDModel,
        subjects,
        positives: list,
        class_images: list,
        device: torch.device,
    ) -> None:
        if config.loss != "dpo":
            raise InputError("The reference path implements the paper's loss only (loss='dpo').")
        self.cfg, self.model, self.device = config, model, torch.device(device)
        self.images = ([s.image for s in subjects], list(positives), list(class_images))
        self.ref_unet = model.unet.requires_grad_(False).eval()  # the original weights
        self.unet = copy.deepcopy(model.unet).requires_grad_(True).train()  # theta
        self.optimizer = self._adamw(self.unet, config.lr_protect)
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        self.diffusion = Diffusion(model.noise_scheduler())
        self.step = 0
        self.history: list[dict] = []
        self.accum: list[torch.Tensor] = []

    def _adamw(self, unet, lr):
        c = self.cfg
        return torch.optim.AdamW(unet.parameters(), lr=lr, betas=(c.adam_beta1, c.adam_beta2),
                                 weight_decay=c.adam_weight_decay, eps=c.adam_epsilon)  # fmt: skip

    def encode(self):
        """Every fixed image through the VAE and both prompts through the text encoder (no cache)."""
        subject, positive, prior = self.images
        m = self.model
        banks = [LatentBank(*m.encode_images(x)) if x else None for x in (subject, positive, prior)]
        embeds = m.encode_prompts([self.cfg.instance_prompt, self.cfg.class_prompt])
        return (*banks, embeds[:1], embeds[1:])

    def predict(self, unet, batch: NoisyBatch) -> torch.Tensor:
        return unet_call(unet, batch.latents, batch.timesteps, batch.embeds)

    def personalization_loss(self, unet, data) -> torch.Tensor:
        subject, _, prior, inst_emb, cls_emb = data
        b, g, cfg = self.cfg.batch_size, self.generator, self.cfg
        inst = self.diffusion.noisy(subject.draw(b, g), inst_emb, g)
        loss = noise_prediction_loss(self.predict(unet, inst), inst.target)
        if prior is not None and cfg.prior_weight > 0:
            cls = self.diffusion.noisy(prior.draw(b, g), cls_emb, g)
            loss = loss + cfg.prior_weight * noise_prediction_loss(self.predict(unet, cls), cls.target)
        return loss

    def protection_loss(self, unet, data) -> torch.Tensor:
        subject, positive, prior, inst_emb, cls_emb = data
        b, g, cfg = self.cfg.batch_size, self.generator, self.cfg
        use_prior = prior is not None and cfg.prior_weight > 0
        cls = self.diffusion.noisy(prior.draw(b, g), cls_emb, g) if use_prior else None
        k = torch.randint(0, len(subject), (b,), generator=g)
        z_pos, z_neg = positive.sample(k, g), subject.sample(k, g)
        noise, t = self.diffusion.noise_and_timesteps(z_pos, g)
        pos = self.diffusion.noisy(z_pos, inst_emb, g, noise, t)
        neg = self.diffusion.noisy(z_neg, inst_emb, g, noise, t)
        err_pos = (self.predict(unet, pos) - pos.target).pow(2)
        err_neg = (self.predict(unet, neg) - neg.target).pow(2)
        with torch.no_grad():
            ref_pos = (self.predict(self.ref_unet, pos) - pos.target).pow(2)
            ref_neg = (self.predict(self.ref_unet, neg) - neg.target).pow(2)
        loss, _ = dpo_loss(err_pos, err_neg, ref_pos, ref_neg, cfg.beta, cfg.dpo_reduction)
        if use_prior:
            loss = loss + cfg.prior_weight * noise_prediction_loss(self.predict(unet, cls), cls.target)
        return loss

    def outer_step(self) -> dict:
        cfg = self.cfg
        unet_p = copy.deepcopy(self.unet)  # theta' <- theta
        params_p = list(unet_p.parameters())
        inner_opt = self._adamw(unet_p, cfg.lr_personalize)
        total = [torch.zeros_like(p) for p in params_p]
        per_losses, prot_losses = [], []

        def protection_grad(data) -> None:
            inner_opt.zero_grad(set_to_none=True)
            loss = self.protection_loss(unet_p, data)
            loss.backward()
            prot_losses.append(float(loss.detach()))
            for t, p in zip(total, params_p):
                if p.grad is not None:
                    t.add_(p.grad.clone())

        if cfg.inner_steps == 0:
            protection_grad(self.encode())
        for _ in range(cfg.inner_steps):
            data = self.encode()
            inner_opt.zero_grad(set_to_none=True)
            loss = self.personalization_loss(unet_p, data)
            loss.backward()
            per_losses.append(float(loss.detach()))
            grad_per = [p.grad.clone() if p.grad is not None else None for p in params_p]
            inner_opt.step()
            protection_grad(data)
            if cfg.accumulation == "protect+personalize":
                for t, gp in zip(total, grad_per):
                    if gp is not None:
                        t.add_(gp)
        self.accum = total  # the accumulated protection gradient of this outer step
        for p, t in zip(self.unet.parameters(), total):
            p.grad = t
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        entry = {
            "step": self.step,
            "loss_per": sum(per_losses) / len(per_losses) if per_losses else None,
            "loss_protect": sum(prot_losses) / len(prot_losses),
        }
        self.history.append(entry)
        return entry


# ------------------------------------------------------------------------------------------
# UNet shapes
# ------------------------------------------------------------------------------------------
_SD15_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
UNET_CONFIGS = {
    # Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json): 859.5M parameters.
    "sd15": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        **_SD15_BLOCKS,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },  # fmt: skip
    # The same topology (blocks, attention layers, heads) at a quarter of the width: ~54M parameters,
    # for CPU measurements of the relative effect of the levers.
    "sd15-small": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [80, 160, 320, 320],
        **_SD15_BLOCKS,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
    },  # fmt: skip
}
TEXT_DIM = 768  # SD1.x text embedding width (the tiny text encoder of the benchmarks has it too)


def _shipped_unet_config(kind: str) -> dict:
    import json

    from apdm_core.detection import config_dir

    cfg = json.loads((config_dir(kind) / "unet" / "config.json").read_text(encoding="utf-8"))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


# SDXL base's UNet (the shipped sd_configs/sdxl): 2567.5M parameters; and its topology (blocks, transformer
# depths 1/2/10) at a quarter of the width (225.3M parameters) for CPU measurements
UNET_CONFIGS["sdxl"] = _shipped_unet_config("sdxl")
UNET_CONFIGS["sdxl-small"] = {**UNET_CONFIGS["sdxl"], "block_out_channels": [80, 160, 320],
                              "attention_head_dim": [5, 10, 20], "norm_num_groups": 16}  # fmt: skip


def bench_model(unet: str = "tiny", seed: int = 0) -> SDModel:
    """An SD-shaped model with random weights: the UNet of ``unet`` ('tiny', 'sd15', 'sd15-small')
    with the tiny VAE and a tiny 768-wide text encoder (they run once per run in the fast path);
    'sdxl', 'sdxl-small': SDXL's UNet with two tiny text encoders of SDXL's widths (768 and 1280, pooled
    1280); 'world' is the shipped demo-world model itself (trained weights)."""
    from apdm_core.tiny import build_tiny_model, build_tiny_xl_model, tiny_configs, tiny_xl_configs

    if unet == "tiny":
        return build_tiny_model(seed=seed)
    if unet == "world":
        from apdm_core.world import load_world_model

        return load_world_model()
    if unet not in UNET_CONFIGS:
        raise InputError(f"Unknown UNet {unet!r}; choose tiny, world, {', '.join(UNET_CONFIGS)}.")
    if unet.startswith("sdxl"):
        configs = tiny_xl_configs(latent_size=8)
        configs["unet"] = dict(UNET_CONFIGS[unet])
        configs["text_encoder"].update(hidden_size=768, intermediate_size=1536, num_attention_heads=12)
        configs["text_encoder_2"].update(hidden_size=1280, intermediate_size=2560, num_attention_heads=20,
                                         projection_dim=1280)  # fmt: skip
        return build_tiny_xl_model(seed=seed, configs=configs)
    configs = tiny_configs(latent_size=8, text_dim=TEXT_DIM)
    configs["unet"] = dict(UNET_CONFIGS[unet])
    return build_tiny_model(seed=seed, configs=configs)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------
# memory estimate
# ------------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """Bytes of the training state on the compute device, by part (an estimate: see ``estimate_memory``)."""

    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self, unit: float = 2**30) -> str:
        items = ", ".join(f"{k} {v / unit:.2f}" for k, v in self.parts.items() if v)
        return f"{self.total / unit:.2f} GiB ({items})"


def estimate_memory(
    n_params: int,
    config: ProtectConfig,
    activations: float = 0.0,
    processes: int = 1,
    n_attacked: int | None = None,
    n_protected: int | None = None,
) -> MemoryEstimate:
    """What the L2P trainer keeps on the compute device for a UNet of ``n_params`` parameters.

    Counted by parameter: theta' fp32 (4 B), the accumulator (4 B), theta''s gradient (4 B, none
    with optimizer_in_backward), the attacker's AdamW moments (8 B; ~2 B in 8 bits), the reference
    UNet (4 B fp32, 2 B half), theta (4 B) and the outer AdamW moments (8 B / ~2 B) unless
    offload_outer, plus the bf16 copy of the weights that a bf16-autocast forward saves for its
    backward (2 B; recomputed instead with gradient checkpointing).
    ``activations``: bytes saved for the backward of the largest forward (see
    ``saved_activation_bytes``). FSDP divides the sharded parts by ``processes``. CUDA context,
    allocator fragmentation and kernels' workspaces (typically 0.5-1.5 GiB) are not included.
    ``n_attacked``: parameters the simulated attacker trains (``attacker_layers``; default all): the
    gradient, accumulator and attacker moments exist for these only. ``n_protected``: parameters the
    protection changes (``protect_layers``): the outer AdamW moments exist for these only.
    """
    p = float(n_params)
    a = float(n_params if n_attacked is None else n_attacked)
    q = float(n_params if n_protected is None else n_protected)
    eight_bit = config.optimizer == "adamw8bit"
    moments = 2.0 if eight_bit else 8.0
    fsdp = config.distributed == "fsdp" and processes > 1
    shard = processes if fsdp else 1
    offload = config.offload_outer or fsdp
    parts = {
        "theta'": 4 * p / shard,
        "accumulator": 4 * a / shard,
        "gradient": 0.0 if config.optimizer_in_backward and processes == 1 else 4 * a / shard,
        "attacker AdamW": moments * a / shard,
        "reference": (4 if config.ref_precision == "fp32" else 2) * p / shard,
        "theta": 0.0 if offload else 4 * p,
        "outer AdamW": 0.0 if offload else moments * q,
        "autocast weights": 2 * p
        if config.mixed_precision == "bf16" and not config.gradient_checkpointing
        else 0.0,
        "activations": float(activations),
    }
    return MemoryEstimate(parts)


# ------------------------------------------------------------------------------------------
# measurements without running the model: FLOPs and saved activations on the meta device
# ------------------------------------------------------------------------------------------
def _meta_unet(unet_config: dict, dtype: torch.dtype, gradient_checkpointing: bool = False):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    unet = unet.to(dtype) if dtype != torch.float32 else unet
    unet.train()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def _meta_inputs(unet_config: dict, batch: int, resolution: int, dtype: torch.dtype, seq: int = 77):
    """Latents, timesteps and the packed conditioning (SDXL: with its pooled/size rows, apdm_core.sdxl)."""
    from apdm_core.sdxl import extra_rows

    lat = resolution // 8
    x = torch.empty(batch, unet_config.get("in_channels", 4), lat, lat, device="meta", dtype=dtype)
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    rows = seq + extra_rows(unet_config)
    c = torch.empty(batch, rows, unet_config.get("cross_attention_dim", TEXT_DIM), device="meta", dtype=dtype)
    return x, t, c


def layer_parameter_counts(unet_config: dict) -> dict[str, int]:
    """Parameters of the UNet that each ``protect_layers``/``attacker_layers`` choice selects, counted on
    one UNet built on the meta device ("all": the whole UNet)."""
    from apdm_core.levers import PROTECT_LAYERS

    params = [(n, p.numel()) for n, p in _meta_unet(unet_config, torch.float32).named_parameters()]
    return {layers: sum(k for n, k in params if keep(n)) for layers, keep in PROTECT_LAYERS.items()}


def count_unet_flops(unet_config: dict, resolution: int, batch: int = 1, backward: bool = True) -> int:
    """FLOPs of one UNet forward (+ backward) on ``batch`` samples, counted by
    ``torch.utils.flop_counter`` on the meta device (no computation, no memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = _meta_unet(unet_config, torch.float32)
    x, t, c = _meta_inputs(unet_config, batch, resolution, torch.float32)
    with FlopCounterMode(display=False) as counter:
        out = unet_call(unet, x, t, c)
        if backward:
            out.sum().backward()
    return int(counter.get_total_flops())


def l2p_flops_per_inner_step(unet_config: dict, resolution: int, config: ProtectConfig) -> int:
    """FLOPs of one L2P inner step: the attacker's forward+backward on instance (+ class) samples,
    the protection forward+backward on positive, negative (+ class) samples, and the reference
    forward on the pair."""
    b = config.batch_size
    prior = 1 if config.prior_weight > 0 else 0
    train = count_unet_flops(unet_config, resolution, 1, backward=True)
    fwd = count_unet_flops(unet_config, resolution, 1, backward=False)
    return int(b * ((1 + prior) * train + (2 + prior) * train + 2 * fwd))


class _FusedAttentionSaves(torch.autograd.Function):
    """Stand-in for SDPA that keeps what the fused CUDA kernels (flash / memory-efficient) keep for
    the backward: q, k, v, the output and the row log-sum-exp, not the attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - only shapes matter on the meta device
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(q, k, v, *args, **kwargs):
    return _FusedAttentionSaves.apply(q, k, v)


def saved_activation_bytes(
    unet_config: dict,
    resolution: int,
    batch: int,
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
) -> int:
    """Bytes of the tensors one UNet forward on ``batch`` samples keeps for its backward (the
    activation memory), measured with saved-tensor hooks on the meta device; parameters are not
    counted. ``dtype`` bf16 approximates a bf16-autocast forward. Attention is counted as the
    fused CUDA kernels store it (on the meta device SDPA would fall back to the math path, which
    keeps the full attention matrix)."""
    from unittest import mock

    unet = _meta_unet(unet_config, dtype, gradient_checkpointing)
    x, t, c = _meta_inputs(unet_config, batch, resolution, dtype)
    params = {p.untyped_storage()._cdata for p in unet.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return tensor

    sdpa = mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa)
    with sdpa, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet_call(unet, x, t, c)
    return sum(seen.values())
