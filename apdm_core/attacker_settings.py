"""The simulated attacker's settings and what anchors utility (group "robust" of ProtectConfig).

ProtectConfig inherits them after the run's own settings (``config.RunSettings``), so the fields keep their
place within their group in the CLI, the nodes and the UIs; README "Protection that holds" measures them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .configio import ConfigIO, _f

LAYER_CHAIN = ("all", "attention", "cross_attention", "cross_attention_kv")  # each holds the next
# + the cross-attention with the UNet's input/output convolutions, timestep embedding and samplers
PROTECT_LAYERS = (*LAYER_CHAIN, "cross_attention_interface")


def layers_within(inner: str, outer: str) -> bool:
    """Whether every UNet parameter that ``inner`` selects is among those ``outer`` selects."""
    if outer in ("all", inner):
        return True
    if "cross_attention_interface" in (inner, outer):
        return outer == "cross_attention_interface" and inner in LAYER_CHAIN[2:]
    return LAYER_CHAIN.index(inner) >= LAYER_CHAIN.index(outer)


ATTACKER_KINDS = ("full", "lora")  # the simulated attacker's kinds (l2p/episode.py)


@dataclass
class AttackerSettings(ConfigIO):
    """How the simulated attacker of the L2P loop is drawn and what anchors utility."""

    resync_every: int = _f(
        1,
        "Refill the simulated attacker theta' from theta (fresh attacker optimizer) every this many outer "
        "steps; 1 = the paper (every outer step). R > 1 = a persistent attacker: theta' continues across R "
        "outer steps (each outer update is applied to theta' too), so the protection sees R x inner_steps "
        "attack steps for the cost of inner_steps.",
        group="robust",
    )
    protect_every: int = _f(
        1,
        "Take the protection gradient at every k-th simulated attack step only (1 = every step, the paper).",
        group="robust",
    )
    late_weighting: float = _f(
        0.0,
        "Weight the protection gradient at attack step h of an attacker episode by exp(w * (h - H)), H the "
        "episode length (0 = equal weights, the paper; TAR uses 0.0625 per step).",
        group="robust",
    )
    conflict_weight: float = _f(
        0.0,
        "Weight of a term that makes the simulated attacker's gradients on two independent batches disagree "
        "(their cosine at theta', once per outer step; second order): Adam's step follows the gradients' "
        "signal-to-noise ratio, so this aims to slow the attacker rather than pre-compensate its path (0 = off).",
        group="robust",
    )
    trap_weight: float = _f(
        0.0,
        "Weight of a collapse trap at the attacked weights (CTRAP-style; needs the anchor's images): once per outer "
        "step, the simulated attacker's model is pulled to predict the opposite of what the original predicts on "
        "a batch of anchor images, weighted by how far the attacker has walked in its episode (h / episode "
        "length), so that progress on the subject is coupled to losing every prompt while the anchor keeps theta "
        "(0 = off).",
        group="robust",
    )
    tail_average: int = _f(
        0,
        "Export the mean of theta over the run's last this many outer steps instead of theta after the last one "
        "(tail averaging, as SWA): the final theta answers the last simulated attacker it met; the mean answers "
        "the attackers of several episodes. Changes only the exported model, not the run (0 = off).",
        group="robust",
    )
    protect_beta1: float = _f(
        0.0,
        "beta1 (momentum) of the protection's own AdamW, the outer optimizer of theta (0 = adam_beta1, which the "
        "simulated attacker keeps). The protection gradient's signs agree from one simulated attacker to the next on "
        "only about 70% of the weights; a longer momentum averages more outer steps before Adam's sign-like step.",
        group="robust",
    )
    sam_radius: float = _f(
        0.0,
        "Sharpness-aware protection (SAM on the protection loss, as 2502.05374 for unlearning against relearning): "
        "each protection gradient is taken at theta' moved by this fraction of its norm toward where the protection "
        "loss rises fastest (same batch; theta' restored), so the protection holds in a neighbourhood of the attacked "
        "weights, not at one point. 0 = off; costs one more forward and backward per protection gradient.",
        group="robust",
    )
    sam_weights: str = _f(
        "all",
        "Which weights of theta' sam_radius moves: all (SAM) or others (only those outside protect_layers: the "
        "attacker's weights that cancel a protection step, README eleventh round).",
        group="robust",
        choices=("all", "others"),
    )
    hypergradient: bool = _f(
        False,
        "Differentiate the protection losses through the simulated DreamBooth steps of each outer step (an "
        "unrolled, second-order hypergradient with respect to theta' at the step's start) instead of taking the "
        "gradient at the attacked weights (first order). The graph keeps every unrolled step: for small models "
        "(the demo world); LoRA episodes stay first order; one process, PyTorch attention.",
        group="robust",
    )
    inner_batch_size: int = _f(
        0,
        "Subject images per simulated attack step (0 = batch_size); the world's attacker uses 2.",
        group="robust",
    )
    inner_max_grad_norm: float = _f(
        0.0,
        "Clip the simulated attacker's gradient norm (0 = no clipping; DreamBooth clips at 1).",
        group="robust",
    )
    inner_batch_sizes: list[int] = _f(
        [],
        "Batch sizes the simulated attacker's episodes draw from, one per episode (empty = inner_batch_size "
        "for every episode): attackers whose batch size is not known.",
        group="robust",
    )
    lr_personalize_max: float = _f(
        0.0,
        "When above lr_personalize, each attacker episode draws its learning rate log-uniformly from "
        "[lr_personalize, lr_personalize_max] (attackers whose lr is not known).",
        group="robust",
    )
    attacker_family: list[str] = _f(
        ["full"],
        "The simulated attacker's kinds, one per episode in turn (an episode lasts resync_every outer steps): "
        "'full' (DreamBooth on the whole UNet, the paper) and 'lora' (DreamBooth-LoRA on the attention "
        "projections, as people run it); e.g. full lora.",
        group="robust",
    )
    lora_ranks: list[int] = _f(
        [4, 16],
        "Ranks a LoRA attacker episode draws from (alpha = rank, as diffusers' script).",
        group="robust",
    )
    lora_lr: float = _f(1e-4, "Learning rate of a LoRA attacker episode (the lower end with lora_lr_max).",
                        group="robust")  # fmt: skip
    lora_lr_max: float = _f(
        0.0, "When above lora_lr, each LoRA episode draws its lr log-uniformly from [lora_lr, lora_lr_max].",
        group="robust",
    )  # fmt: skip
    anchor_weight: float = _f(
        0.0,
        "Weight of the utility anchor on theta: noise-prediction distillation to the frozen original on "
        "images of anchor_prompts (relative to one protection term; 0 = off, the paper).",
        group="robust",
    )
    anchor_prompts: list[str] = _f(
        [],
        "Prompts the anchor keeps besides the class prompt, which always takes half of the anchor "
        "(their images are generated by the base model and cached).",
        group="robust",
    )
    anchor_unconditional: bool = _f(
        False,
        "The anchor also keeps the empty prompt: the unconditional prediction that classifier-free guidance "
        "subtracts at every sampling step, which the class prompt's own term does not hold (its drift, "
        "scaled by the guidance, costs the class; README 'Several subjects in one model').",
        group="robust",
    )
    num_anchor_images: int = _f(8, "Anchor images per anchor prompt.", group="robust")
    extra_identifiers: list[str] = _f(
        [],
        "Other identifier words for the simulated attacker: each attacker episode uses one of the instance "
        "prompt's identifier and these, drawn at random, so that an attacker with another identifier is "
        "covered too (PersGuard's gray-box training).",
        group="robust",
    )
    protect_layers: str = _f(
        "all",
        "UNet layers the protection changes: all (the paper), attention (self + cross), cross_attention "
        "(IMMA's choice), cross_attention_kv (only the keys and values of the text: the weights null_space "
        "controls), cross_attention_interface (the cross-attention plus the input/output convolutions, the "
        "timestep embedding and the down/upsamplers: the weights without which the world model learns a "
        "subject no faster than a random UNet); the simulated attacker trains the whole UNet, as the real one does (unless "
        "attacker_layers narrows it).",
        PROTECT_LAYERS,
        group="robust",
    )
    attacker_layers: str = _f(
        "all",
        "UNet layers the simulated attacker's DreamBooth episodes train: all (the real attacker's full "
        "fine-tune, the paper) or, to save memory on large models (SDXL on a 24 GB GPU), attention, "
        "cross_attention: the attacker's gradients, accumulator and AdamW moments then exist for those layers "
        "only. Must include protect_layers. LoRA episodes train their adapters either way.",
        PROTECT_LAYERS,
        group="robust",
    )
    null_space: float = _f(
        0.0,
        "Keep the class prompt's (and anchor_prompts', with null_space_anchors) keys and values in the "
        "cross-attention as they were: every change of a to_k / to_v weight is projected away from the "
        "directions that hold this share of those prompts' token-embedding energy (e.g. 0.999; 0 = off). "
        "With protect_layers='cross_attention_kv' the class prompt then generates as before, whatever the "
        "protection does (SPEED-style null-space edit).",
        group="robust",
    )
    null_space_anchors: bool = _f(
        False, "null_space also keeps the anchor prompts' keys and values (not only the class prompt's).",
        group="robust",
    )  # fmt: skip
