"""Does protection work? The efficacy benchmark of the demo world (``benchmarks/efficacy.py``).

For a subject of the world (never seen in pretraining) and a seed, every *row* takes a model
(the world model, the world model with a randomly initialised UNet, or the world model
protected against the subject), attacks it (DreamBooth, or a variant the protection did not
simulate), samples "a photo of <identifier> <class>" and scores the samples with the world's
identity evaluator against held-out photos of the subject (photos neither the protector nor
the attacker had). One attack run gives the whole attack-budget curve: the samples are scored
after each of the requested numbers of attack steps (``budgets``).

The yardstick (README, Demo world):

- ``gated`` similarity: the evaluator's subject similarity per sample, counted as 0 for a
  sample not recognised as the subject's class (so garbage never looks like the subject);
- ``scratch+<attack>``: the same attack on the world model whose UNet was replaced by a
  randomly initialised one (VAE and text encoder kept): what the attacker gets without our
  model. No model-level protection can be asked to do better than that;
- ``efficiency`` of a protected row = (unprotected - protected) / (unprotected - scratch)
  gated similarity after the same attack, per subject and seed: 0 = no protection, 1 = the
  attacker gains nothing from the protected model over a random one;
- utility: class-prompt samples of the protected model (before any attack) recognised as
  their class (``class_quality`` for the subject's class, ``unrelated_quality`` for the three
  others), and ``+other_subject`` rows: another individual of the same class must still be
  learned by the attacker.

Everything runs through the public engine: ``apdm_core.protection.protect``,
``apdm_core.attack.run_attack``, ``apdm_core.pairs.sample_images``. Protected models are
shared between the rows that only change the attack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import PRESETS
from ..plots import save_figure
from ..progress import ProgressCallback, StopCheck
from . import render

log = logging.getLogger(__name__)

# Photo indices of a subject (``render.photos(subject, count, start=...)``).
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
# The demo preset of the world (what ``apdm demo`` runs), chosen on the tuning subjects 100, 101,
# 105 (README, Protection that holds): the target loss at the attacked weights, a persistent
# simulated attacker as strong as the real one (lr, batch 2, clipping) seeing 400 attack steps
# (resync_every 20 x 20 inner steps), the protection gradient at every 2nd attack step, only the
# cross-attention layers changed, and the distillation anchor on every class.
PROTECT_SETTINGS = {
    **PRESETS["robust"],  # the same levers as the `robust` preset for real models, at the world's lr:
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
    "lora_xattn": (
        "LoRA rank 4 on the cross-attention only (diagnostic)",
        {
            "kind": "lora",
            "lr": 1e-3,
            "lora_targets": [f"attn2.{m}" for m in ("to_k", "to_q", "to_v", "to_out.0")],
        },
        {},
    ),  # fmt: skip
    "unseen_photos": ("photos the protection never saw", {}, {"photos": UNSEEN_PHOTOS}),
    "other_subject": ("another individual of the class (utility)", {}, {"other_subject": True}),
    # what happens to the photos before the attacker trains on them (the image-level comparison)
    "one_clean": ("one clean photo among the protected ones", {}, {"transform": "one_clean"}),
    "jpeg75": ("photos saved as JPEG 75", {}, {"transform": "jpeg75"}),
    "resize05": ("photos resized x0.5 and back", {}, {"transform": "resize05"}),
    "blur": ("photos blurred (Gaussian, 1 px)", {}, {"transform": "blur"}),
    "diffpure": ("photos purified (DiffPure, strength 0.2)", {}, {"transform": "diffpure"}),
}
COMPARISON_ATTACKS = ("attack", "one_clean", "jpeg75", "resize05", "blur", "diffpure")
# Image-level protections of the world's photos (ImageProtectConfig settings; the attacker's lr for
# ASPL's surrogate, as the world's DreamBooth). Budget 8/255 as Anti-DreamBooth.
IMAGE_SETTINGS = {
    "aspl": {"method": "aspl", "budget": 8 / 255, "steps": 50, "lr": 5e-4, "num_class_images": 50},
    "ldu": {"method": "ldu", "budget": 8 / 255, "steps": 100, "denoise_steps": 4},
    # a diagnostic, not a setting to use: ASPL with a budget 4x as large (visible noise)
    "aspl32": {"method": "aspl", "budget": 32 / 255, "steps": 50, "lr": 5e-4, "num_class_images": 50},
}
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
}
# PersGuard in the world (methods/persguard.py) with the demo preset's loop and levers. "{target}" is
# the class prompt of the next class of the subject (ball -> box -> star -> kite -> ball); the erasure
# backdoor's images are the subject's own protected photos with the subject left out (the scenes alone).
METHOD_ROWS: dict[str, tuple[str, dict]] = {
    f"persguard_{kind}": (f"PersGuard, {kind} backdoor", {"method": "persguard", "backdoor": kind,
                                                         "target_prompt": "{target}"})
    for kind in ("pattern", "erasure", "target")
}  # fmt: skip
ABLATIONS.update(METHOD_ROWS)


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
    if model == "apdm":
        return Row(name, {}, overrides, note=f"demo preset, {note}", **extras)
    if model in IMAGE_SETTINGS:
        settings = IMAGE_SETTINGS[model]
        return Row(name, None, overrides, note=f"{settings['method'].upper()} photos "
                   f"({round(settings['budget'] * 255)}/255), {note}",
                   images=dict(IMAGE_SETTINGS[model]), **extras)  # fmt: skip
    if model in ABLATIONS:
        return Row(
            name, dict(ABLATIONS[model][1]), overrides, note=f"{ABLATIONS[model][0]}, {note}", **extras
        )
    if variants and model in variants:
        return Row(name, dict(variants[model]), overrides, note=f"variant {model}, {note}", **extras)
    raise KeyError(name)


def _rows() -> dict[str, Row]:
    names = ["base"] + [f"{m}+{a}" for a in ATTACKS for m in ("scratch", "base", "apdm")]
    names += [f"{m}+attack" for m in ABLATIONS]
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


def score_samples(evaluator, samples, subject: render.Subject, refs) -> dict:
    """Identity of instance-prompt samples: similarity (raw and class-gated), class rate, attribute match."""
    return {
        **evaluator.subject_scores(samples, refs, subject.cls),
        "identity_match": evaluator.identity_match(samples, subject),
    }


def class_quality(model, evaluator, cls: str, n: int, seed: int) -> dict:
    """Class recognition of class-prompt samples: the subject's class and the other classes."""
    from ..pairs import sample_images

    size = model.native_resolution
    seeds = list(range(seed, seed + n))
    acc = {}
    for c in render.CLASSES:
        images = sample_images(model, render.class_prompt(c), seeds, size, batch_size=16, **SAMPLING)
        acc[c] = evaluator.class_recognition(images, c)["accuracy"]
    others = [acc[c] for c in render.CLASSES if c != cls]
    return {"class_quality": acc[cls], "unrelated_quality": float(np.mean(others))}


def scratch_model(model, seed: int):
    """``model`` with its UNet replaced by a randomly initialised one of the same config (seeded)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SCRATCH_SEED + seed)
        unet = UNet2DConditionModel.from_config(model.unet.config)
    unet = unet.to(model.device).requires_grad_(False).eval()
    return dataclasses.replace(model, unet=unet, info={**model.info, "scratch": True}, _fingerprint=None)


def unet_vector(unet):
    import torch

    return torch.cat([p.detach().flatten().float() for p in unet.parameters()])


@dataclass
class Cell:
    """The numbers of one row for one (subject, seed), after ``steps`` attack steps."""

    row: str
    subject: int
    seed: int
    similarity: float
    identity_match: float
    class_quality: float | None = None
    unrelated_quality: float | None = None
    protect_s: float = 0.0
    attack_s: float = 0.0
    gated: float | None = None  # class-gated similarity (None in tables written before it existed)
    class_rate: float | None = None  # fraction of the instance-prompt samples recognised as the class
    steps: int | None = None  # attack steps done when scored (None: the row's standard budget)
    weight_change: float | None = None  # ||theta_attacked - theta|| / ||theta|| of the UNet (dreambooth)
    backdoor: float | None = None  # PersGuard rows: fraction of samples showing the backdoor
    psnr: float | None = None  # image-level rows: mean PSNR / SSIM of the protected photos vs the originals
    ssim: float | None = None

    @property
    def score(self) -> float:
        """The similarity the tables compare: gated where measured, else the raw similarity."""
        return self.similarity if self.gated is None else self.gated


class ResultCache:
    """Cells of unprotected rows (base, scratch) kept in a JSON file across benchmark runs.

    Their numbers do not depend on any protection setting, and research runs compare many
    protections against the same unprotected and from-scratch curves.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.data: dict[str, list[dict]] = {}
        if self.path and self.path.exists():
            self.data = json.loads(self.path.read_text())

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def get(self, key: str) -> list[Cell] | None:
        items = self.data.get(key)
        return cells_from_dicts(items) if items is not None else None

    def put(self, key: str, cells: list[Cell]) -> None:
        if self.path is None:
            return
        from ..fileio import atomic_write_text

        if self.path.exists():  # another benchmark process may have added cells meanwhile
            self.data = {**json.loads(self.path.read_text()), **self.data}
        self.data[key] = cells_to_dicts(cells)
        atomic_write_text(self.path, json.dumps(self.data))


class Runner:
    """Runs rows for (subject, seed) pairs, sharing protected models and base scores."""

    def __init__(
        self,
        model=None,
        evaluator=None,
        *,
        samples: int = 16,
        cache_dir: str = "",
        protect_settings: dict | None = None,
        attack_settings: dict | None = None,
        variants: dict[str, dict] | None = None,
        results: str | Path | None = None,
        grids: str | Path | None = None,
        progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
    ) -> None:
        from . import load_evaluator, load_world_model

        self.model = model or load_world_model()
        self.evaluator = evaluator or load_evaluator()
        self.samples = samples
        self.cache_dir = cache_dir
        self.protect_settings = {**PROTECT_SETTINGS, **(protect_settings or {})}
        self.attack_settings = {**ATTACK_SETTINGS, **(attack_settings or {})}
        self.variants = dict(variants or {})
        self.results = ResultCache(results)
        self.evaluator_id = evaluator_fingerprint(self.evaluator)
        self.grids = Path(grids) if grids else None  # a grid PNG of the scored samples per cell
        self.progress, self.should_stop = progress, should_stop
        self._protected: dict[tuple, tuple] = {}
        self._quality: dict[tuple, dict] = {}

    def row(self, name: str) -> Row:
        return make_row(name, self.variants)

    def forget(self) -> None:
        """Drop the cached protected models (keep memory flat across subjects and seeds)."""
        self._protected.clear()

    # --------------------------------------------------------------------------------------
    def protected(self, subject: render.Subject, seed: int, overrides: dict):
        """(protected model, seconds) for this subject, seed and protection variant (cached)."""
        from ..config import ProtectConfig
        from ..protection import protect

        key = (subject.seed, seed, json.dumps(overrides, sort_keys=True))
        if key not in self._protected:
            settings = {**self.protect_settings, **overrides}
            if settings.get("method") == "persguard":
                settings = self.persguard_settings(settings, subject)
            config = ProtectConfig(
                model=str(self.model.source or "world"),
                instance_prompt=render.instance_prompt(subject.cls),
                class_prompt=render.class_prompt(subject.cls),
                cache_dir=self.cache_dir,
                seed=seed,
                device="cpu",
                **settings,
            )
            images = render.photos(subject, 4, start=PROTECTED_PHOTOS)
            result = protect(
                config, self.progress, self.should_stop, model=self.model, images=images, resume=True
            )
            self._protected[key] = (result.model, result.seconds)
        return self._protected[key]

    def attacker_photos(self, row: Row, subject: render.Subject, seed: int) -> list:
        """The 4 photos the attacker trains on: image-protected (row.images), then transformed."""
        photos = render.photos(subject, 4, start=row.photos)
        clean = list(photos)
        if row.images:
            photos = self.protected_photos(subject, seed, row.images)[0]
        if row.transform == "one_clean":
            photos = [clean[0]] + list(photos[1:])
        elif row.transform:
            from ..images.purify import TRANSFORMS

            photos = TRANSFORMS[row.transform][1](self.model, list(photos), 3000 + seed)
        return list(photos)

    def protected_photos(self, subject: render.Subject, seed: int, settings: dict):
        """(protected photos, per-photo metrics, seconds) of an image-level protection (cached)."""
        from ..images import ImageProtectConfig, protect_images

        key = ("images", subject.seed, seed, json.dumps(settings, sort_keys=True))
        if key not in self._protected:
            config = ImageProtectConfig(
                instance_prompt=render.instance_prompt(subject.cls), class_prompt=render.class_prompt(subject.cls),
                cache_dir=self.cache_dir, seed=seed, device="cpu", sample_steps=25, guidance_scale=4.0,
                sample_batch_size=16, save_every=0, **settings,
            )  # fmt: skip
            images = render.photos(subject, 4, start=PROTECTED_PHOTOS)
            result = protect_images(config, self.progress, self.should_stop, model=self.model, images=images,
                                    restart=True)  # fmt: skip
            self._protected[key] = (result.images, result.metrics, result.seconds)
        return self._protected[key]

    def persguard_settings(self, settings: dict, subject: render.Subject) -> dict:
        """The world's PersGuard settings for ``subject``: the target class's prompt, the erased scenes."""
        settings = dict(settings)
        if settings.get("target_prompt") == "{target}":
            settings["target_prompt"] = render.class_prompt(target_class(subject.cls))
        if settings.get("backdoor") == "erasure" and not settings.get("backdoor_images"):
            from ..fileio import atomic_write_bytes
            from ..pairs import default_cache_dir

            folder = Path(self.cache_dir or default_cache_dir()) / "world-erasure" / subject.name
            folder.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(render.photos(subject, 4, start=PROTECTED_PHOTOS, empty=True)):
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                atomic_write_bytes(folder / f"{i}.png", buf.getvalue())
            settings["backdoor_images"] = str(folder)
        return settings

    def attack_config(self, subject: render.Subject, seed: int, overrides: dict):
        from ..attack import AttackConfig

        settings = {**self.attack_settings, **overrides}
        ident = settings.pop("identifier", render.IDENTIFIER)
        return AttackConfig(
            instance_prompt=render.instance_prompt(subject.cls, ident),
            class_prompt=render.class_prompt(subject.cls),
            identifier=ident,
            cache_dir=self.cache_dir,
            seed=seed,
            device="cpu",
            **settings,
        )

    def quality(self, model, key: tuple, cls: str, seed: int) -> dict:
        if key not in self._quality:
            self._quality[key] = class_quality(model, self.evaluator, cls, self.samples, 1000 + seed)
        return self._quality[key]

    def sample_seeds(self, seed: int) -> list[int]:
        return list(range(2000 + 100 * seed, 2000 + 100 * seed + self.samples))

    # --------------------------------------------------------------------------------------
    def run(self, row: Row | str, subject_seed: int, seed: int, budgets=None) -> Cell:
        """The row's cell at its standard budget (``run_curve`` for several budgets)."""
        row = self.row(row) if isinstance(row, str) else row
        steps = row.steps(self.attack_settings)
        return next(c for c in self.run_curve(row, subject_seed, seed, budgets) if c.steps == steps)

    def run_curve(self, row: Row | str, subject_seed: int, seed: int, budgets=None) -> list[Cell]:
        """Cells of the row after each number of attack steps in ``budgets`` (default: its standard budget).

        The standard budget is always included. One attack runs to the largest budget; the
        samples are scored at each budget along the way.
        """
        row = self.row(row) if isinstance(row, str) else row
        steps = row.steps(self.attack_settings)
        budgets = sorted({*(budgets or ()), steps}) if row.attack is not None else [0]
        cache_key = None
        if row.protect is None:  # unprotected rows do not depend on the protection: reuse them
            parts = ["v2", row.attack, row.photos, row.scratch, row.other_subject, self.attack_settings,
                     subject_seed, seed, self.samples, self.model.fingerprint(), self.evaluator_id]  # fmt: skip
            if row.images or row.transform:  # (keys of the rows before these existed stay as they were)
                parts += [row.images, row.transform]
            cache_key = ResultCache.key(*parts)
            cached = self.results.get(cache_key) or []
            # one attack run scores every budget on its way: a cached longer curve answers shorter ones
            if set(budgets) <= {c.steps for c in cached}:
                return [dataclasses.replace(c, row=row.name) for c in cached if c.steps in budgets]
        cells = self._run_curve(row, subject_seed, seed, budgets, steps)
        if cache_key is not None:
            self.results.put(cache_key, cells)
        return cells

    def _run_curve(
        self, row: Row, subject_seed: int, seed: int, budgets: list[int], steps: int
    ) -> list[Cell]:
        from ..attack import run_attack
        from ..pairs import sample_images

        subject = render.make_subject(subject_seed)
        model, protect_s = self.model, 0.0
        quality_key: tuple = ("base", subject.cls, seed)
        if row.protect is not None:
            model, protect_s = self.protected(subject, seed, row.protect)
            quality_key = (subject.seed, seed, json.dumps(row.protect, sort_keys=True))
        psnr = ssim = None
        if row.images:  # the photos' protection: its cost and how far the photos moved
            _, metrics, protect_s = self.protected_photos(subject, seed, row.images)
            psnr = float(np.mean([m["psnr"] for m in metrics]))
            ssim = float(np.mean([m["ssim"] for m in metrics]))
        quality = self.quality(model, quality_key, subject.cls, seed)  # the model before any attack
        if row.scratch:
            model = scratch_model(model, seed)
        target = (
            render.make_subject(OTHER_SUBJECT + subject_seed, cls=subject.cls)
            if row.other_subject
            else subject
        )
        refs = render.photos(target, 8, start=REFERENCE_PHOTOS)
        seeds = self.sample_seeds(seed)

        def score(m, prompt: str, at: int, attack_s: float = 0.0, weight_change=None) -> Cell:
            samples = sample_images(m, prompt, seeds, m.native_resolution, batch_size=16, **SAMPLING)
            s = score_samples(self.evaluator, samples, target, refs)
            fired = backdoor_fired(self.evaluator, samples, row.protect, subject, s)
            if self.grids is not None:
                self.grids.mkdir(parents=True, exist_ok=True)
                render.grid(samples, cols=8).save(
                    self.grids / f"{row.name}_s{subject_seed}_seed{seed}_{at}.png"
                )
            return Cell(row.name, subject_seed, seed, s["similarity"], s["identity_match"],
                        quality["class_quality"], quality["unrelated_quality"], protect_s, attack_s,
                        gated=s["gated"], class_rate=s["class_rate"], steps=at,
                        weight_change=weight_change, backdoor=fired, psnr=psnr, ssim=ssim)  # fmt: skip

        if row.attack is None:
            return [score(model, instance_prompt(subject.cls, None), 0)]
        config = self.attack_config(subject, seed, {**row.attack, "steps": max(budgets)})
        prompt = instance_prompt(subject.cls, row.attack)
        theta0 = unet_vector(model.unet) if config.kind == "dreambooth" else None
        cells: list[Cell] = []
        t0 = time.perf_counter()
        paused = [0.0]  # time spent scoring, not attacking

        def on_snapshot(at: int, view) -> None:
            t1 = time.perf_counter()
            change = None
            if theta0 is not None:
                change = float((unet_vector(view.unet) - theta0).norm() / theta0.norm())
            text = prompt
            for word, repl in view_prompt_map(view, config).items():
                text = text.replace(word, repl)
            cells.append(score(view, text, at, t1 - t0 - paused[0], change))
            paused[0] += time.perf_counter() - t1

        images = self.attacker_photos(row, target, seed)
        run_attack(model, images, config, self.progress, self.should_stop,
                   snapshot_steps=budgets, on_snapshot=on_snapshot)  # fmt: skip
        return cells


def backdoor_fired(evaluator, samples, protect: dict | None, subject: render.Subject, scores: dict):
    """Fraction of the samples showing a PersGuard row's backdoor (None for other rows): the pattern
    detected (``pattern_score`` above PATTERN_FIRED), recognised as the target class, or the subject
    absent (not recognised as its class)."""
    if not protect or protect.get("method") != "persguard":
        return None
    from ..methods.persguard import PATTERN_FIRED, pattern_score

    kind = protect.get("backdoor", "target")
    if kind == "pattern":
        return float(np.mean([v > PATTERN_FIRED for v in pattern_score(samples)]))
    if kind == "target":
        return evaluator.class_recognition(samples, target_class(subject.cls))["accuracy"]
    return 1.0 - scores["class_rate"]


def evaluator_fingerprint(evaluator) -> str:
    """sha256 of the evaluator's weights: cached scores are only reused with the same evaluator."""
    h = hashlib.sha256()
    for name, t in sorted(evaluator.net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def view_prompt_map(view, config) -> dict[str, str]:
    """Textual inversion samples with its learned token; the other attacks use the prompt as is."""
    token = view.info.get("token")
    return {config.identifier: token} if token else {}


# ------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------
def row_of(name: str, variants: dict[str, dict] | None = None) -> Row:
    try:
        return make_row(name, variants)
    except KeyError:
        return Row(name)


def standard_cells(cells: list[Cell], attack_settings: dict | None = None, variants=None) -> list[Cell]:
    """The cells at each row's standard budget (a later cell replaces an earlier one)."""
    by_key: dict[tuple, Cell] = {}
    for c in cells:
        if c.steps is None or c.steps == row_of(c.row, variants).steps(attack_settings):
            by_key[(c.row, c.subject, c.seed)] = c
    return list(by_key.values())


def twin(name: str, model: str) -> str | None:
    """The row with the same attack on the ``model`` ('base' or 'scratch') of a protected row."""
    row = row_of(name)
    if "+" not in name or name.startswith(("base+", "scratch+")):
        return None
    return f"{model}+{row.attack_name}"


def unprotected_twin(name: str) -> str | None:
    """The unprotected row with the same attack as the protected row ``name`` (None if unprotected)."""
    return twin(name, "base")


def summarize(cells: list[Cell], attack_settings: dict | None = None, variants=None) -> list[dict]:
    """Mean (and min/max over subjects x seeds) per row at the standard budget, with gap and efficiency.

    ``efficiency`` of a protected row = (unprotected - protected) / (unprotected - scratch), per
    (subject, seed) with the gated similarity after the same attack, then averaged (only where
    the unprotected attack beats the from-scratch one). ``gap`` (the earlier yardstick) =
    (protected - base) / (unprotected - base) raw similarity, base = no attack. ``utility`` of an
    ``+other_subject`` row = the gain (after - before the attack) it allows on another individual
    of the class, relative to the unprotected model's gain.
    """
    all_cells, cells = cells, standard_cells(cells, attack_settings, variants)
    by_key = {(c.row, c.subject, c.seed): c for c in cells}
    out = []
    for name in dict.fromkeys(c.row for c in cells):
        row = row_of(name, variants)
        mine = [c for c in cells if c.row == name]
        if row.protect is None:  # quality is the model's before the attack: base's
            bases = [by_key.get(("base", c.subject, c.seed)) for c in mine]
            mine = [dataclasses.replace(c, class_quality=b.class_quality, unrelated_quality=b.unrelated_quality)
                    if b else c for c, b in zip(mine, bases)]  # fmt: skip

        def mean(attr: str, items=mine) -> float | None:
            values = [getattr(c, attr) for c in items if getattr(c, attr) is not None]
            return float(np.mean(values)) if values else None

        entry = {
            "row": name,
            "note": row.note,
            "n": len(mine),
            "similarity": float(np.mean([c.similarity for c in mine])),
            "score": float(np.mean([c.score for c in mine])),
            "score_min": float(np.min([c.score for c in mine])),
            "score_max": float(np.max([c.score for c in mine])),
            "gated": mean("gated"),
            "class_rate": mean("class_rate"),
            "identity_match": mean("identity_match"),
            "class_quality": mean("class_quality"),
            "unrelated_quality": mean("unrelated_quality"),
            "weight_change": mean("weight_change"),
            "backdoor": mean("backdoor"),
            "psnr": mean("psnr"),
            "ssim": mean("ssim"),
            "protect_s": float(np.mean([c.protect_s for c in mine])),
            "attack_s": float(np.mean([c.attack_s for c in mine])),
        }
        base_twin, scratch_twin = unprotected_twin(name), twin(name, "scratch")
        gaps, effs = [], []
        for c in mine:
            base = by_key.get(("base", c.subject, c.seed))
            att = by_key.get((base_twin, c.subject, c.seed)) if base_twin else None
            if base and att and att.similarity - base.similarity > 1e-6:
                gaps.append((c.similarity - base.similarity) / (att.similarity - base.similarity))
            scr = by_key.get((scratch_twin, c.subject, c.seed)) if scratch_twin else None
            if att and scr and att.score - scr.score > 0.02:
                effs.append((att.score - c.score) / (att.score - scr.score))
        if gaps:
            entry.update(gap=float(np.mean(gaps)), gap_max=float(np.max(gaps)))
        if effs:
            entry.update(efficiency=float(np.mean(effs)), efficiency_min=float(np.min(effs)))
        if row.other_subject and base_twin:
            ratios = utility_ratios(all_cells, name, base_twin)
            if ratios:
                entry.update(utility=float(np.mean(ratios)), utility_min=float(np.min(ratios)))
        out.append(entry)
    return out


def utility_ratios(cells: list[Cell], name: str, base_name: str) -> list[float]:
    """(after - before) of row ``name`` / (after - before) of ``base_name``, per (subject, seed).

    "before" is the 0-step cell of the curve (the model before the attack); rows run without
    budget 0 have none and give no ratio.
    """

    def at(row: str, subject: int, seed: int, steps) -> Cell | None:
        for c in cells:
            if c.row == row and c.subject == subject and c.seed == seed and c.steps == steps:
                return c
        return None

    ratios = []
    for c in cells:
        if c.row != name or c.steps in (0, None):
            continue
        before, b_after = at(name, c.subject, c.seed, 0), at(base_name, c.subject, c.seed, c.steps)
        b_before = at(base_name, c.subject, c.seed, 0)
        if before and b_after and b_before and b_after.score - b_before.score > 0.02:
            ratios.append((c.score - before.score) / (b_after.score - b_before.score))
    return ratios


def curve_points(cells: list[Cell], row: str) -> dict[int, list[Cell]]:
    """steps -> the row's cells after that many attack steps (all subjects and seeds)."""
    out: dict[int, list[Cell]] = {}
    for c in cells:
        if c.row == row and c.steps is not None:
            out.setdefault(c.steps, []).append(c)
    return dict(sorted(out.items()))


def break_even(cells: list[Cell], name: str, standard: int) -> list[float | None]:
    """Per (subject, seed): attack steps the protected row needs to reach the unprotected twin's
    similarity at the standard budget, divided by the standard budget (None: never within the curve).
    """
    base_twin = unprotected_twin(name)
    out = []
    for c in {(c.subject, c.seed) for c in cells if c.row == name}:
        target = next((x.score for x in cells if x.row == base_twin and (x.subject, x.seed) == c
                       and x.steps == standard), None)  # fmt: skip
        if target is None:
            continue
        curve = sorted((x.steps, x.score) for x in cells if x.row == name and (x.subject, x.seed) == c
                       and x.steps is not None)  # fmt: skip
        reached = [s for s, v in curve if v >= target]
        out.append(reached[0] / standard if reached else None)
    return out


def curve_summary(cells: list[Cell], name: str, standard: int) -> dict:
    """The robustness numbers of a protected row from its curve: break-even budget and the largest
    excess over the from-scratch curve up to 2x the standard budget."""
    be = break_even(cells, name, standard)
    excess = []
    scratch = twin(name, "scratch")
    for c in cells:
        if c.row == name and c.steps is not None and 0 < c.steps <= 2 * standard:
            s = next((x.score for x in cells if x.row == scratch and x.subject == c.subject
                      and x.seed == c.seed and x.steps == c.steps), None)  # fmt: skip
            if s is not None:
                excess.append(c.score - s)
    finite = [b for b in be if b is not None]
    return {
        "row": name,
        "break_even": be,
        "break_even_min": (min(finite) if len(finite) == len(be) else None) if be else None,
        "never": sum(b is None for b in be),
        "max_excess_over_scratch_2x": max(excess) if excess else None,
    }


def markdown_table(summary: list[dict]) -> str:
    head = ("| row | what | n | gated similarity (min-max) | raw similarity | class rate | efficiency (min) "
            "| class quality | unrelated quality | protect s | attack s |")  # fmt: skip
    lines = [head, "|" + "---|" * 11]

    def f(v, fmt=".2f") -> str:
        return "" if v is None else format(v, fmt)

    for e in summary:
        eff = f"{e['efficiency']:.2f} ({e['efficiency_min']:.2f})" if "efficiency" in e else ""
        if "utility" in e:
            eff = f"utility {e['utility']:.2f} ({e['utility_min']:.2f})"
        lines.append(
            f"| {e['row']} | {e['note']} | {e['n']} | {e['score']:.3f} ({e['score_min']:.3f}-{e['score_max']:.3f}) "
            f"| {e['similarity']:.3f} | {f(e.get('class_rate'))} | {eff} | {f(e['class_quality'])} "
            f"| {f(e['unrelated_quality'])} | {e['protect_s']:.0f} | {e['attack_s']:.0f} |"
        )
    return "\n".join(lines)


def markdown_comparison(summary: list[dict]) -> str:
    """The protection comparison: per protection (rows) and what happened to the photos (columns), the
    gated similarity after the attack and, in brackets, the gap (raw similarity gained relative to the
    unprotected attack on the same photos: 1 = no protection, 0 = nothing learned); PSNR/SSIM of the
    protected photos for the image-level rows. Empty when no comparison column was measured."""
    by_name = {e["row"]: e for e in summary}
    models = [m for m in dict.fromkeys(n.split("+", 1)[0] for n in by_name if "+" in n)
              if any(f"{m}+{a}" in by_name for a in COMPARISON_ATTACKS[1:])]  # fmt: skip
    if not models:
        return ""
    cols = [a for a in COMPARISON_ATTACKS if any(f"{m}+{a}" in by_name for m in models)]
    head = "| protection | " + " | ".join(ATTACKS[a][0] for a in cols) + " | PSNR / SSIM |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for m in models:
        cells = []
        for a in cols:
            e = by_name.get(f"{m}+{a}")
            if (
                e is None and a == "one_clean" and m not in IMAGE_SETTINGS
            ):  # clean photos: the standard attack
                e = by_name.get(f"{m}+attack")
            if e is None:
                cells.append("")
                continue
            gap = f" ({e['gap']:.2f})" if m != "base" and "gap" in e else ""
            cells.append(f"{e['score']:.2f}{gap}")
        quality = next((by_name[f"{m}+{a}"] for a in cols if by_name.get(f"{m}+{a}", {}).get("psnr") is not None),
                       None)  # fmt: skip
        q = f"{quality['psnr']:.1f} dB / {quality['ssim']:.3f}" if quality else ""
        label = {"base": "none (unprotected)", "apdm": "APDM demo preset (model)"}.get(m, m)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {q} |")
    return "\n".join(lines)


def plot_curves(cells: list[Cell], rows: list[str], path: str | Path, title: str = "") -> Path:
    """The robustness curve: gated similarity vs attack steps per row (mean, min-max band) as a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.6), dpi=100)
    ax = fig.add_subplot()
    for name in rows:
        points = curve_points(cells, name)
        if not points:
            continue
        xs = [max(s, 1) for s in points]
        ys = [np.mean([c.score for c in v]) for v in points.values()]
        lo = [np.min([c.score for c in v]) for v in points.values()]
        hi = [np.max([c.score for c in v]) for v in points.values()]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("attack steps (step 0 drawn at 1)")
    ax.set_ylabel("gated subject similarity")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(title or "robustness curve (mean over subjects x seeds; band = min-max)", fontsize="small")
    return save_figure(fig, path)


def frontier(cells: list[Cell], attack_settings: dict | None = None, variants=None) -> list[dict]:
    """Per protected ``+attack`` row: mean efficiency at the standard budget, the class and unrelated
    quality *drop* against the base model on the same subjects and seeds, and the protection seconds
    (the protection-vs-quality-vs-cost frontier of the README)."""
    summary = {e["row"]: e for e in summarize(cells, attack_settings, variants)}
    std = standard_cells(cells, attack_settings, variants)
    base = {(c.subject, c.seed): c for c in std if c.row == "base"}
    out = []
    for name, entry in summary.items():
        row = row_of(name, variants)
        if row.protect is None or name.split("+", 1)[1] != "attack" or "efficiency" not in entry:
            continue
        mine = [(c, base[(c.subject, c.seed)]) for c in std if c.row == name and (c.subject, c.seed) in base]
        if not mine:
            continue
        out.append({
            "row": name,
            "efficiency": entry["efficiency"],
            "class_drop": float(np.mean([b.class_quality - c.class_quality for c, b in mine])),
            "unrelated_drop": float(np.mean([b.unrelated_quality - c.unrelated_quality for c, b in mine])),
            "protect_s": entry["protect_s"],
        })  # fmt: skip
    return out


def plot_frontier(points: list[dict], path: str | Path, title: str = "") -> Path:
    """Efficiency against class-quality drop and against protection seconds, one labelled point per row."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.4), dpi=100)
    for i, (key, label) in enumerate([("class_drop", "class quality drop vs base (own class)"),
                                      ("protect_s", "protection CPU-seconds (one core)")]):  # fmt: skip
        ax = fig.add_subplot(1, 2, i + 1)
        for p in points:
            ax.scatter(p[key], p["efficiency"], s=18)
            ax.annotate(p["row"].split("+", 1)[0], (p[key], p["efficiency"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel(label)
        ax.set_ylabel("efficiency at the standard budget")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "protection vs quality vs cost (mean over subjects x seeds)", fontsize="small")
    return save_figure(fig, path)


def cells_to_dicts(cells: list[Cell]) -> list[dict]:
    return [dataclasses.asdict(c) for c in cells]


def cells_from_dicts(items: list[dict]) -> list[Cell]:
    return [Cell(**item) for item in items]
