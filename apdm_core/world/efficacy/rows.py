"""The rows of the efficacy table: which model (unprotected, from scratch, protected by a preset or a
variant, image-protected photos) meets which attack, parsed once from a name ``<model>+<attack>``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PRESETS, ProtectConfig
from ...configio import field_default
from ...levers import PROTECT_LAYERS, unet_interface
from .. import render

PROTECTED_PHOTOS = 0  # 4 photos from here: what the owner protects and what the attacker has
UNSEEN_PHOTOS = 20  # 4 photos the protection never saw (the "leaked other photos" attacker)
REFERENCE_PHOTOS = 100  # 8 photos for the similarity score: seen by nobody
OTHER_SUBJECT = 1000  # another individual of the class: render.make_subject(OTHER_SUBJECT + seed, cls=...)
SCRATCH_SEED = 10_000  # the random UNet of seed s is initialised with torch seed SCRATCH_SEED + s

# Prompts the demo preset's anchor keeps besides the subject's class prompt: every class, plain and
# with a colour word.
ANCHOR_PROMPTS = [render.class_prompt(c) for c in render.CLASSES] + [
    f"a photo of {color} {cls}"
    for pair in (("red", "blue", "green", "yellow"), ("pink", "cyan", "orange", "purple"))
    for color, cls in zip(pair, render.CLASSES)
]
# The world's learning rates and data on top of a preset for real models: the simulated attacker as strong
# as the real one (lr, batch 2, clipping), the anchor on every class (ANCHOR_PROMPTS), 25 sampling steps.
WORLD_SETTINGS = {
    "lr_protect": 5e-4,
    "lr_personalize": 5e-4,  # the attacker's learning rate
    "inner_batch_size": 2,
    "anchor_prompts": ANCHOR_PROMPTS,
    "num_class_images": 50,
    "sample_steps": 25,
    "guidance_scale": 4.0,
    "sample_batch_size": 16,
    "save_every": 0,
}
# The `robust` preset at the world's lr (the demo preset before the attacker family): the target loss at
# the attacked weights, a persistent simulated attacker seeing 400 attack steps (resync_every 20 x 20
# inner steps), the protection gradient at every 2nd attack step, only the cross-attention layers
# changed, the distillation anchor on every class.
ROBUST_SETTINGS = {**PRESETS["robust"], **WORLD_SETTINGS}
# The attacker family in the loop (l2p.episode): every episode a DreamBooth or a LoRA attacker (rank 4 or
# 16), its learning rate drawn log-uniformly up to 4x the attacker's (LoRA: 1e-3 .. 1e-2, the world's
# LoRA attack and its 10x), each episode 40 outer steps (800 attack steps, 2x the standard attack), 200
# outer steps.
FAMILY_SETTINGS = {
    "attacker_family": ["full", "lora"],
    "lora_ranks": [4, 16],
    "lora_lr": 1e-3,
    "lora_lr_max": 1e-2,
    "lr_personalize_max": 2e-3,
    "resync_every": 40,
    "outer_steps": 200,
}
# The demo preset of the world (what ``apdm demo`` runs: the `family` preset at the world's lr), chosen on
# the tuning subjects 100, 101, 105 (README, Protection that holds).
PROTECT_SETTINGS = {**ROBUST_SETTINGS, **FAMILY_SETTINGS}
# The demo preset before this one: APDM as published (DPO, a fresh attacker every outer step, the
# whole UNet, no anchor), 40 x 10 steps; the protection that did not hold.
PUBLISHED_SETTINGS = {
    "loss": "dpo",
    "outer_steps": 40,
    "inner_steps": 10,
    "resync_every": 1,
    "protect_every": 1,
    "protect_layers": "all",
    "lr_protect": 1e-5,
    "inner_batch_size": 0,
    "inner_max_grad_norm": 0.0,
    "anchor_weight": 0.0,
    "anchor_prompts": [],
}
# The attacker's DreamBooth in the world (the paper's recipe, scaled to the tiny model).
ATTACK_SETTINGS = {
    "kind": "dreambooth",
    "steps": 400,
    "lr": 5e-4,
    "batch_size": 2,
    "num_class_images": 50,
    "sample_steps": 25,
    "guidance_scale": 4.0,
    "sample_batch_size": 16,
    "random_crop": False,
    "save_every": 0,
}
SAMPLING = {"steps": 25, "guidance": 4.0}
BUDGETS = (0, 25, 50, 100, 200, 400, 800, 1600)  # attack steps of the robustness curve


@dataclass(frozen=True)
class Row:
    """One line of the table: a model (unprotected, from scratch or protected) and an attack."""

    name: str
    protect: dict | None = None  # ProtectConfig overrides on top of PROTECT_SETTINGS; None = not protected
    attack: dict | None = field(default_factory=dict)  # AttackConfig overrides; None = no attack
    photos: int = PROTECTED_PHOTOS  # first photo index the attacker trains on
    note: str = ""
    scratch: bool = False  # attack the world model with a randomly initialised UNet
    other_subject: bool = False  # attack (and score) another individual of the subject's class
    images: dict | None = (
        None  # image-level protection of the attacker's photos (ImageProtectConfig overrides)
    )
    transform: str = (
        ""  # what happened to the photos before the attack: one_clean or images.purify.TRANSFORMS
    )
    before: str = ""  # what happened to the model before the attack: RECOVERY rows, or a weight round trip
    reset: str = ""  # RESETS: these UNet parameters taken from the random UNet of scratch rows, the rest kept

    @property
    def model_name(self) -> str:
        return self.name.split("+", 1)[0]

    @property
    def attack_name(self) -> str:
        return self.name.split("+", 1)[1] if "+" in self.name else ""

    def steps(self, attack_settings: dict | None = None) -> int:
        """The attack steps of this row's standard cell (0 without an attack)."""
        if self.attack is None:
            return 0
        return int(self.attack.get("steps", (attack_settings or ATTACK_SETTINGS)["steps"]))


# attack variants: name -> (note, AttackConfig overrides, Row extras)
ATTACKS: dict[str, tuple[str, dict, dict]] = {
    "attack": ("DreamBooth", {}, {}),
    "identifier": ("another identifier (toy)", {"identifier": "toy"}, {}),
    "lr05x": ("0.5x attack learning rate", {"lr": 0.5 * ATTACK_SETTINGS["lr"]}, {}),
    "lr2x": ("2x attack learning rate", {"lr": 2 * ATTACK_SETTINGS["lr"]}, {}),
    "lr4x": ("4x attack learning rate", {"lr": 4 * ATTACK_SETTINGS["lr"]}, {}),
    "steps2x": ("2x attack steps", {"steps": 2 * ATTACK_SETTINGS["steps"]}, {}),
    "lora": ("LoRA attack (rank 4)", {"kind": "lora", "lr": 1e-3}, {}),
    # the attacker sweep (README "Protection that holds": the worst case over these is the headline)
    "lora_lr4x": ("LoRA rank 4, 4x lr", {"kind": "lora", "lr": 4e-3}, {}),
    "lora16": ("LoRA rank 16", {"kind": "lora", "lr": 1e-3, "lora_rank": 16, "lora_alpha": 16.0}, {}),
    "lora16_lr4x": (
        "LoRA rank 16, 4x lr",
        {"kind": "lora", "lr": 4e-3, "lora_rank": 16, "lora_alpha": 16.0},
        {},
    ),
    "lora_lr10x": ("LoRA rank 4, 10x lr", {"kind": "lora", "lr": 1e-2}, {}),
    "lora16_lr10x": (
        "LoRA rank 16, 10x lr",
        {"kind": "lora", "lr": 1e-2, "lora_rank": 16, "lora_alpha": 16.0},
        {},
    ),
    "lora_xattn": (
        "LoRA rank 4 on the cross-attention only (diagnostic)",
        {
            "kind": "lora",
            "lr": 1e-3,
            "lora_targets": [f"attn2.{m}" for m in ("to_k", "to_q", "to_v", "to_out.0")],
        },
        {},
    ),
    "unseen_photos": ("photos the protection never saw", {}, {"photos": UNSEEN_PHOTOS}),
    # attacks on the protection itself, before the personalization: recovery fine-tunes, weight round trips
    "recover_class": (
        "fine-tuned 300 steps on other individuals of the class first",
        {},
        {"before": "recover_class"},
    ),
    "recover_unrelated": ("fine-tuned 300 steps on another class first", {}, {"before": "recover_unrelated"}),
    "fp16": ("weights through float16 first", {}, {"before": "fp16"}),
    "int8": ("weights through 8-bit quantization first", {}, {"before": "int8"}),
    # the longitudinal attacker: personalizes another subject (the first companion) first, then this one
    "longitudinal": ("DreamBooth on another subject first, then on this one", {}, {"before": "learn_other"}),
    "other_subject": ("another individual of the class (utility)", {}, {"other_subject": True}),
    # what happens to the photos before the attacker trains on them (the image-level comparison)
    "one_clean": ("one clean photo among the protected ones", {}, {"transform": "one_clean"}),
    "jpeg75": ("photos saved as JPEG 75", {}, {"transform": "jpeg75"}),
    "resize05": ("photos resized x0.5 and back", {}, {"transform": "resize05"}),
    "blur": ("photos blurred (Gaussian, 1 px)", {}, {"transform": "blur"}),
    "diffpure": ("photos purified (DiffPure, strength 0.2)", {}, {"transform": "diffpure"}),
}
COMPARISON_ATTACKS = ("attack", "one_clean", "jpeg75", "resize05", "blur", "diffpure")
# The attacker sweep (README "Protection that holds"): every attacker a protection is judged by; the
# headline is the worst case over these (with the standard attack at 2x its budget) per subject and seed.
SWEEP_ATTACKS = ("attack", "lr05x", "lr2x", "lr4x", "identifier", "unseen_photos", "lora", "lora_lr4x", "lora_lr10x",
                 "lora16", "lora16_lr4x", "lora16_lr10x")  # fmt: skip
RECOVERY_ATTACKS = ("recover_class", "recover_unrelated", "fp16", "int8")
# The recovery fine-tune: the attacker's DreamBooth recipe on 4 photos each of RECOVERY_INDIVIDUALS other
# individuals (render.make_subject(RECOVERY_SEED + i, cls)), with the class prompt and no prior.
RECOVERY_SEED = 5000
RECOVERY_INDIVIDUALS = 2
RECOVERY_STEPS = 300
# Image-level protections of the world's photos (ImageProtectConfig settings; the attacker's lr for
# ASPL's surrogate, as the world's DreamBooth). Budget 8/255 as Anti-DreamBooth.
IMAGE_SETTINGS = {
    "aspl": {"method": "aspl", "budget": 8 / 255, "steps": 50, "lr": 5e-4, "num_class_images": 50},
    "ldu": {"method": "ldu", "budget": 8 / 255, "steps": 100, "denoise_steps": 4},
    # a diagnostic, not a setting to use: ASPL with a budget 4x as large (visible noise)
    "aspl32": {"method": "aspl", "budget": 32 / 255, "steps": 50, "lr": 5e-4, "num_class_images": 50},
}
# robust on top of PROTECT_SETTINGS: the family's settings back at robust's (the defaults)
ROBUST_OVERRIDES = {k: ROBUST_SETTINGS.get(k, field_default(ProtectConfig, k)) for k in FAMILY_SETTINGS}
# protection variants of the table: name -> (note, ProtectConfig overrides on PROTECT_SETTINGS)
ABLATIONS: dict[str, tuple[str, dict]] = {
    "published": ("APDM as published (the earlier demo preset)", PUBLISHED_SETTINGS),
    "dpo_only": ("published, ablation: DPO without L2P", {**PUBLISHED_SETTINGS, "inner_steps": 0}),
    "naive": ("published, ablation: naive -L_per + lambda L_ppl", {**PUBLISHED_SETTINGS, "loss": "naive"}),
    "reference_accum": (
        "published, ablation: accumulation of the released code",
        {**PUBLISHED_SETTINGS, "accumulation": "protect+personalize"},
    ),
    "beta10": ("published, ablation: beta 10", {**PUBLISHED_SETTINGS, "beta": 10.0}),
    "fresh": ("demo preset, lever off: a fresh attacker every outer step", {"resync_every": 1}),
    "dpo": ("demo preset, lever off: DPO instead of the target loss", {"loss": "dpo", "lr_protect": 1e-4}),
    "all_layers": ("demo preset, lever off: the whole UNet protected", {"protect_layers": "all"}),
    "no_anchor": ("demo preset, lever off: no anchor", {"anchor_weight": 0.0}),
    "single_kind": ("demo preset, lever off: DreamBooth episodes only", {"attacker_family": ["full"]}),
    "horizon400": ("demo preset, lever off: episodes of 400 attack steps", {"resync_every": 20}),
    "horizon1600": ("demo preset, episodes of 1600 attack steps (4x the attack)", {"resync_every": 80}),
    "long400": ("demo preset, 400 outer steps (twice the protection training)", {"outer_steps": 400}),
    "late": (
        "demo preset, the protection gradient at attack step h weighted exp(0.005 (h - 800)) (TAR's late weighting)",
        {"late_weighting": 0.005},
    ),
    "lr2x": ("demo preset, twice the protection lr (1e-3)", {"lr_protect": 1e-3}),
    "batches": (
        "demo preset, each attacker episode's batch drawn from 1, 2, 4",
        {"inner_batch_sizes": [1, 2, 4]},
    ),
    # fifth round: slow the attacker (its gradients' signal-to-noise ratio) instead of pre-compensating its path
    "conflict": (
        "demo preset + the attacker's gradients on two batches made to disagree (conflict_weight 0.1)",
        {"conflict_weight": 0.1},
    ),
    "uncond": ("demo preset + the empty prompt in the anchor", {"anchor_unconditional": True}),
    "single_kind_uncond": (
        "demo preset, DreamBooth episodes only, the empty prompt in the anchor",
        {"attacker_family": ["full"], "anchor_unconditional": True},
    ),
    # the demo preset before this one, and what was tried on it against the LoRA and 2x attackers
    "robust": ("the robust preset (the earlier demo preset)", ROBUST_OVERRIDES),
    "family": ("the family preset (= the demo preset)", {}),
    "lora_episodes": (
        "robust + LoRA episodes in the loop",
        {**ROBUST_OVERRIDES, "attacker_family": ["full", "lora"]},
    ),
    "lr_range": ("robust + attacker lr drawn up to 4x", {**ROBUST_OVERRIDES, "lr_personalize_max": 2e-3}),
    "kv_nullspace": (
        "robust on the cross-attention K/V only, null-space projected (0.999)",
        {**ROBUST_OVERRIDES, "protect_layers": "cross_attention_kv", "null_space": 0.999},
    ),
    "nullspace": (
        "robust, K/V changes null-space projected (0.999)",
        {**ROBUST_OVERRIDES, "null_space": 0.999},
    ),
}
# PersGuard in the world (methods/persguard.py) with the demo preset's loop and levers. "{target}" is
# the class prompt of the next class of the subject (ball -> box -> star -> kite -> ball); the erasure
# backdoor's images are the subject's own protected photos with the subject left out (the scenes alone).
METHOD_ROWS: dict[str, tuple[str, dict]] = {
    f"persguard_{kind}": (
        f"PersGuard, {kind} backdoor",
        {"method": "persguard", "backdoor": kind, "target_prompt": "{target}"},
    )
    for kind in ("pattern", "erasure", "target")
}
ABLATIONS.update(METHOD_ROWS)
# Several subjects (the demo preset, runner.companions): k others in the same run; one added afterwards
# to the protected model, without or with replaying this subject's terms.
MULTI_ROWS: dict[str, tuple[str, dict]] = {
    **{f"multi{n}": (f"demo preset, {n} subjects in one run", {"companions": n - 1}) for n in (2, 5)},
    # the subjects take turns by episode (40 outer steps): 200 outer steps cover 5, so 10 need 400
    "multi10": (
        "demo preset, 10 subjects in one run, 400 outer steps (an episode each)",
        {"companions": 9, "outer_steps": 400},
    ),
    "seq": ("demo preset, then another subject added from the protected model", {"then_add": 1}),
    "seqreplay": (
        "demo preset, then another subject added, this one replayed",
        {"then_add": 1, "replay": True},
    ),
    # the second round against the original model (reference_model) instead of the protected one
    "seqref": (
        "demo preset, then another subject added against the original model",
        {"then_add": 1, "from_original": True},
    ),
    "seqreplayref": (
        "demo preset, then another subject added against the original model, this one replayed",
        {"then_add": 1, "replay": True, "from_original": True},
    ),
    # seqreplayref with the empty prompt in both rounds' anchor (anchor_unconditional)
    "seqreplayrefunc": (
        "demo preset, then another subject added against the original model, this one replayed, "
        "the empty prompt anchored",
        {"then_add": 1, "replay": True, "from_original": True, "anchor_unconditional": True},
    ),
    # turns by outer step, each subject's attacker parked between its turns (interleave_subjects)
    "multi5i": (
        "demo preset, 5 subjects in one run, turns by outer step",
        {"companions": 4, "interleave_subjects": True},
    ),
    # who the companions are: only the subject's class, or only the other classes (default: the world's first)
    "multi5same": (
        "demo preset, 5 subjects of one class in one run",
        {"companions": 4, "companion_class": "same"},
    ),
    "multi5other": (
        "demo preset, 5 subjects in one run, the others of other classes",
        {"companions": 4, "companion_class": "other"},
    ),
    # 5 subjects with 5x the outer steps: each subject gets the single-subject run's steps (the same cost per subject)
    "multi5long": (
        "demo preset, 5 subjects in one run, 5x the outer steps",
        {"companions": 4, "outer_steps": 1000},
    ),
}
ABLATIONS.update(MULTI_ROWS)


# The ceiling of a protection confined to some parameters: the world model with those parameters taken
# from the from-scratch rows' random UNet (all it knew there removed, nothing else touched).
# model name -> (what, parameter-name predicate)
RESETS: dict[str, tuple[str, object]] = {
    "reset_kv": ("cross-attention keys and values", PROTECT_LAYERS["cross_attention_kv"]),
    "reset_xattn": ("cross-attention", PROTECT_LAYERS["cross_attention"]),
    "reset_attn": ("self- and cross-attention", PROTECT_LAYERS["attention"]),
    "reset_transformer": ("transformer blocks (attention, feed-forward)", lambda n: "attentions." in n),
    "reset_resnets": ("ResNet blocks", lambda n: ".resnets." in n),
    "reset_nonresnets": ("everything but the ResNet blocks", lambda n: ".resnets." not in n),
    "reset_other": ("input/output convolutions, timestep embedding, samplers", unet_interface),
}


COMPANION_SEEDS = tuple(range(300, 320))  # other subjects protected in the same run (multi-subject rows)
COMPANION_IDS = ("zwx", "qkv", "vbn", "plk", "dtr", "mqz", "hjy", "xcv", "bnm", "wrt", "gfd", "ytp")


def companions(k: int, exclude: int | None = None, cls: str = "", same: bool = True) -> list[render.Subject]:
    """The first ``k`` companion subjects of the world (never the subject itself); with ``cls``, only those of
    that class (``same``) or only those of the other classes."""
    if not cls:
        return [render.make_subject(s) for s in COMPANION_SEEDS if s != exclude][:k]
    pool = (
        render.make_subject(s) for s in range(COMPANION_SEEDS[0], COMPANION_SEEDS[0] + 200) if s != exclude
    )
    return [c for c in pool if (c.cls == cls) == same][:k]


def target_class(cls: str) -> str:
    """The target backdoor's class for a subject of class ``cls`` in the world."""
    return render.CLASSES[(render.CLASSES.index(cls) + 1) % len(render.CLASSES)]


def make_row(name: str, variants: dict[str, dict] | None = None) -> Row:
    """The row ``<model>+<attack>`` (or ``base``): model base, scratch, apdm, an ablation or a variant."""
    if name == "base":
        return Row("base", None, None, note="base model, no attack")
    model, _, attack = name.partition("+")
    if attack not in ATTACKS:
        raise KeyError(name)
    note, overrides, extras = ATTACKS[attack]
    if model == "base":
        return Row(name, None, overrides, note=f"unprotected, {note}", **extras)
    if model == "scratch":
        return Row(name, None, overrides, note=f"random UNet, {note}", scratch=True, **extras)
    if model in RESETS:
        what = f"{RESETS[model][0]} re-initialised, {note}"
        return Row(name, None, overrides, note=what, reset=model, **extras)
    if model == "apdm":
        return Row(name, {}, overrides, note=f"demo preset, {note}", **extras)
    if model in IMAGE_SETTINGS:
        settings = IMAGE_SETTINGS[model]
        return Row(
            name,
            None,
            overrides,
            note=f"{settings['method'].upper()} photos ({round(settings['budget'] * 255)}/255), {note}",
            images=dict(IMAGE_SETTINGS[model]),
            **extras,
        )
    if model in ABLATIONS:
        return Row(
            name, dict(ABLATIONS[model][1]), overrides, note=f"{ABLATIONS[model][0]}, {note}", **extras
        )
    if variants and model in variants:
        return Row(name, dict(variants[model]), overrides, note=f"variant {model}, {note}", **extras)
    raise KeyError(name)


def _rows() -> dict[str, Row]:
    names = ["base"] + [f"{m}+{a}" for a in ATTACKS for m in ("scratch", "base", "apdm")]
    names += [f"{m}+attack" for m in ABLATIONS] + [f"{m}+attack" for m in RESETS]
    return {n: make_row(n) for n in names}


ROWS = _rows()
CORE_ROWS = ("base", "base+attack", "apdm+attack")
# Bounds of the CI test (tests/test_efficacy.py), from the measured table in the README.
# All on the class-gated similarity (Cell.gated).
CI_MIN_ATTACK_GAIN = 0.2  # the unprotected attack must raise the gated similarity at least this much
CI_MAX_GAP = 0.5  # the protected attack may gain at most this fraction of the unprotected gain
CI_MAX_QUALITY_DROP = 0.25  # the protected model must still draw its class / other classes


def instance_prompt(cls: str, attack: dict | None) -> str:
    ident = (attack or {}).get("identifier", render.IDENTIFIER)
    return render.instance_prompt(cls, ident)


__all__ = [
    "COMPANION_IDS",
    "COMPANION_SEEDS",
    "companions",
    "RECOVERY_ATTACKS",
    "RECOVERY_INDIVIDUALS",
    "RECOVERY_SEED",
    "RECOVERY_STEPS",
    "SWEEP_ATTACKS",
    "ABLATIONS",
    "ANCHOR_PROMPTS",
    "ATTACKS",
    "ATTACK_SETTINGS",
    "BUDGETS",
    "CI_MAX_GAP",
    "CI_MAX_QUALITY_DROP",
    "CI_MIN_ATTACK_GAIN",
    "COMPARISON_ATTACKS",
    "CORE_ROWS",
    "FAMILY_SETTINGS",
    "ROBUST_SETTINGS",
    "WORLD_SETTINGS",
    "IMAGE_SETTINGS",
    "METHOD_ROWS",
    "MULTI_ROWS",
    "OTHER_SUBJECT",
    "PROTECTED_PHOTOS",
    "PROTECT_SETTINGS",
    "PUBLISHED_SETTINGS",
    "REFERENCE_PHOTOS",
    "RESETS",
    "ROWS",
    "Row",
    "SAMPLING",
    "SCRATCH_SEED",
    "UNSEEN_PHOTOS",
    "instance_prompt",
    "make_row",
    "target_class",
]
