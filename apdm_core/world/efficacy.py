"""Does protection work? The efficacy benchmark of the demo world (``benchmarks/efficacy.py``).

For a subject of the world (never seen in pretraining) and a seed, every *row* protects the
world model (or not), attacks it with DreamBooth (or a variant the protection did not
simulate), samples "a photo of <identifier> <class>" and scores the samples with the world's
identity evaluator against held-out photos of the subject (photos neither the protector nor
the attacker had). Utility is scored on the protected model before any attack: how often
samples of the subject's class prompt, and of the other classes' prompts, are recognised as
their class.

Everything runs through the public engine: ``apdm_core.protect.protect``,
``apdm_core.attack.run_attack``, ``apdm_core.pairs.sample_images``. Protected models are
shared between the rows that only change the attack.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..progress import ProgressCallback, StopCheck
from . import render

log = logging.getLogger(__name__)

# Photo indices of a subject (``render.photos(subject, count, start=...)``).
PROTECTED_PHOTOS = 0  # 4 photos from here: what the owner protects and what the attacker has
UNSEEN_PHOTOS = 20  # 4 photos the protection never saw (the "leaked other photos" attacker)
REFERENCE_PHOTOS = 100  # 8 photos for the similarity score: seen by nobody

# The demo preset of the world (what ``apdm demo`` runs): small, CPU-minutes.
PROTECT_SETTINGS = {
    "outer_steps": 40,
    "inner_steps": 10,
    "lr_protect": 1e-5,
    "lr_personalize": 5e-4,  # the attacker's learning rate
    "num_class_images": 50,
    "sample_steps": 25,
    "guidance_scale": 4.0,
    "sample_batch_size": 16,
    "save_every": 0,
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


@dataclass(frozen=True)
class Row:
    """One line of the table: a protection (None = unprotected) and an attack (None = no attack)."""

    name: str
    protect: dict | None = None  # ProtectConfig overrides on top of PROTECT_SETTINGS
    attack: dict | None = field(default_factory=dict)  # AttackConfig overrides on top of ATTACK_SETTINGS
    photos: int = PROTECTED_PHOTOS  # first photo index the attacker trains on
    note: str = ""


def _rows() -> dict[str, Row]:
    apdm: dict = {}
    unseen = {
        "identifier": ("Different identifier", {"identifier": "toy"}),
        "lr2x": ("2x attack learning rate", {"lr": 2 * ATTACK_SETTINGS["lr"]}),
        "steps2x": ("2x attack steps", {"steps": 2 * ATTACK_SETTINGS["steps"]}),
        "lora": ("LoRA attack (rank 4)", {"kind": "lora", "lr": 1e-3}),
    }
    rows = [
        Row("base", None, None, note="base model, no attack"),
        Row("base+attack", None, {}, note="unprotected, DreamBooth"),
        Row("apdm+attack", apdm, {}, note="APDM (DPO + L2P), same attack"),
        Row("dpo_only+attack", {"inner_steps": 0}, {}, note="ablation: DPO without L2P"),
        Row("naive+attack", {"loss": "naive"}, {}, note="ablation: naive -L_per + lambda L_ppl"),
        Row(
            "reference_accum+attack",
            {"accumulation": "protect+personalize"},
            {},
            note="ablation: accumulation of the released code",
        ),  # fmt: skip
        Row("beta10+attack", {"beta": 10.0}, {}, note="ablation: beta 10"),
    ]
    for key, (note, attack) in unseen.items():
        rows.append(Row(f"base+{key}", None, attack, note=f"unprotected, {note}"))
        rows.append(Row(f"apdm+{key}", apdm, attack, note=f"APDM, {note}"))
    rows.append(
        Row("base+unseen_photos", None, {}, UNSEEN_PHOTOS, "unprotected, photos protection never saw")
    )
    rows.append(Row("apdm+unseen_photos", apdm, {}, UNSEEN_PHOTOS, "APDM, photos protection never saw"))
    return {r.name: r for r in rows}


ROWS = _rows()
CORE_ROWS = ("base", "base+attack", "apdm+attack")
# Bounds of the CI test (tests/test_efficacy.py), from the measured table in the README.
CI_MIN_ATTACK_GAIN = 0.2  # the unprotected attack must raise similarity at least this much
CI_MAX_GAP = 0.5  # the protected attack should gain at most this fraction of it (not reached yet)
CI_MAX_QUALITY_DROP = 0.25  # the protected model must still draw its class


def instance_prompt(cls: str, attack: dict | None) -> str:
    ident = (attack or {}).get("identifier", render.IDENTIFIER)
    return render.instance_prompt(cls, ident)


def score_samples(evaluator, samples, subject: render.Subject, refs) -> dict:
    """Identity of instance-prompt samples: similarity to the references and attribute match."""
    return {
        "similarity": evaluator.subject_similarity(samples, refs),
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


@dataclass
class Cell:
    """The numbers of one row for one (subject, seed)."""

    row: str
    subject: int
    seed: int
    similarity: float
    identity_match: float
    class_quality: float | None = None
    unrelated_quality: float | None = None
    protect_s: float = 0.0
    attack_s: float = 0.0


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
        self.progress, self.should_stop = progress, should_stop
        self._protected: dict[tuple, tuple] = {}
        self._quality: dict[tuple, dict] = {}

    def forget(self) -> None:
        """Drop the cached protected models (keep memory flat across subjects and seeds)."""
        self._protected.clear()

    # --------------------------------------------------------------------------------------
    def protected(self, subject: render.Subject, seed: int, overrides: dict):
        """(protected model, seconds) for this subject, seed and protection variant (cached)."""
        from ..config import ProtectConfig
        from ..protect import protect

        key = (subject.seed, seed, tuple(sorted(overrides.items())))
        if key not in self._protected:
            settings = {**self.protect_settings, **overrides}
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
            result = protect(config, self.progress, self.should_stop, model=self.model, images=images)
            self._protected[key] = (result.model, result.seconds)
        return self._protected[key]

    def attacked(self, model, subject: render.Subject, seed: int, overrides: dict, photos: int):
        from ..attack import AttackConfig, run_attack

        settings = {**self.attack_settings, **overrides}
        ident = settings.pop("identifier", render.IDENTIFIER)
        config = AttackConfig(
            instance_prompt=render.instance_prompt(subject.cls, ident),
            class_prompt=render.class_prompt(subject.cls),
            identifier=ident,
            cache_dir=self.cache_dir,
            seed=seed,
            device="cpu",
            **settings,
        )
        images = render.photos(subject, 4, start=photos)
        return run_attack(model, images, config, self.progress, self.should_stop)

    def quality(self, model, key: tuple, cls: str, seed: int) -> dict:
        if key not in self._quality:
            self._quality[key] = class_quality(model, self.evaluator, cls, self.samples, 1000 + seed)
        return self._quality[key]

    # --------------------------------------------------------------------------------------
    def run(self, row: Row, subject_seed: int, seed: int) -> Cell:
        from ..pairs import sample_images

        subject = render.make_subject(subject_seed)
        refs = render.photos(subject, 8, start=REFERENCE_PHOTOS)
        model, protect_s = self.model, 0.0
        quality_key: tuple = ("base", subject.cls, seed)
        if row.protect is not None:
            model, protect_s = self.protected(subject, seed, row.protect)
            quality_key = (subject.seed, seed, tuple(sorted(row.protect.items())))
        quality = self.quality(model, quality_key, subject.cls, seed)
        attack_s = 0.0
        prompt = instance_prompt(subject.cls, row.attack)
        if row.attack is not None:
            t0 = time.perf_counter()
            result = self.attacked(model, subject, seed, row.attack, row.photos)
            attack_s = time.perf_counter() - t0
            model = result.model
            prompt = result.prompt(prompt)
        seeds = list(range(2000 + 100 * seed, 2000 + 100 * seed + self.samples))
        samples = sample_images(model, prompt, seeds, model.native_resolution, batch_size=16, **SAMPLING)
        scores = score_samples(self.evaluator, samples, subject, refs)
        return Cell(row.name, subject_seed, seed, scores["similarity"], scores["identity_match"],
                    quality["class_quality"], quality["unrelated_quality"], protect_s, attack_s)  # fmt: skip


# ------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------
def summarize(cells: list[Cell]) -> list[dict]:
    """Mean (and min/max over subjects x seeds) per row, with the protection gap ratio.

    ``gap`` of a protected row = (similarity after attack - base similarity) / (similarity of
    the unprotected model after the same attack - base similarity), per (subject, seed), then
    averaged: 0 = the attack learned nothing, 1 = protection did nothing.
    """
    by_key = {(c.row, c.subject, c.seed): c for c in cells}  # a later cell replaces an earlier one
    cells = list(by_key.values())
    out = []
    for name in dict.fromkeys(c.row for c in cells):
        mine = [c for c in cells if c.row == name]
        if ROWS.get(name, Row(name)).protect is None:  # quality is the model's before the attack: base's
            bases = [by_key.get(("base", c.subject, c.seed)) for c in mine]
            mine = [dataclasses.replace(c, class_quality=b.class_quality, unrelated_quality=b.unrelated_quality)
                    if b else c for c, b in zip(mine, bases)]  # fmt: skip
        row = ROWS.get(name, Row(name))
        entry = {
            "row": name,
            "note": row.note,
            "n": len(mine),
            "similarity": float(np.mean([c.similarity for c in mine])),
            "similarity_min": float(np.min([c.similarity for c in mine])),
            "similarity_max": float(np.max([c.similarity for c in mine])),
            "identity_match": float(np.mean([c.identity_match for c in mine])),
            "class_quality": float(np.mean([c.class_quality for c in mine])),
            "unrelated_quality": float(np.mean([c.unrelated_quality for c in mine])),
            "protect_s": float(np.mean([c.protect_s for c in mine])),
            "attack_s": float(np.mean([c.attack_s for c in mine])),
        }
        twin = unprotected_twin(name)
        if twin:
            gaps = []
            for c in mine:
                base, att = by_key.get(("base", c.subject, c.seed)), by_key.get((twin, c.subject, c.seed))
                if base and att and att.similarity - base.similarity > 1e-6:
                    gaps.append((c.similarity - base.similarity) / (att.similarity - base.similarity))
            if gaps:
                entry.update(gap=float(np.mean(gaps)), gap_max=float(np.max(gaps)))
        out.append(entry)
    return out


def unprotected_twin(name: str) -> str | None:
    """The unprotected row with the same attack as the protected row ``name`` (None if unprotected)."""
    row = ROWS.get(name)
    if row is None or row.protect is None:
        return None
    for other in ROWS.values():
        if other.protect is None and other.attack == row.attack and other.photos == row.photos:
            return other.name
    return None


def markdown_table(summary: list[dict]) -> str:
    head = ("| row | what | n | similarity (min-max) | gap | class quality | unrelated quality "
            "| protect s | attack s |")  # fmt: skip
    lines = [head, "|" + "---|" * 9]
    for e in summary:
        gap = f"{e['gap']:.2f} (max {e['gap_max']:.2f})" if "gap" in e else ""
        lines.append(
            f"| {e['row']} | {e['note']} | {e['n']} | {e['similarity']:.3f} ({e['similarity_min']:.3f}-"
            f"{e['similarity_max']:.3f}) | {gap} | {e['class_quality']:.2f} | {e['unrelated_quality']:.2f} "
            f"| {e['protect_s']:.0f} | {e['attack_s']:.0f} |"
        )
    return "\n".join(lines)


def cells_to_dicts(cells: list[Cell]) -> list[dict]:
    return [dataclasses.asdict(c) for c in cells]


def cells_from_dicts(items: list[dict]) -> list[Cell]:
    return [Cell(**item) for item in items]
