"""Running rows: protect (cached per subject, seed and variant), attack with snapshots along the
way, sample and score with the world's evaluator; unprotected cells kept in a results cache."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...progress import ProgressCallback, StopCheck
from .. import render
from .baselines import reset_model, scratch_model, soup_model
from .cells import Cell, ResultCache, evaluator_fingerprint
from .rows import (
    ATTACK_SETTINGS,
    COMPANION_IDS,
    OTHER_SUBJECT,
    PROTECT_SETTINGS,
    PROTECTED_PHOTOS,
    RECOVERY_INDIVIDUALS,
    RECOVERY_SEED,
    RECOVERY_STEPS,
    REFERENCE_PHOTOS,
    SAMPLING,
    Row,
    companions,
    instance_prompt,
    make_row,
    target_class,
)

log = logging.getLogger(__name__)


def score_samples(evaluator, samples, subject: render.Subject, refs) -> dict:
    """Identity of instance-prompt samples: similarity (raw and class-gated), class rate, attribute match."""
    return {
        **evaluator.subject_scores(samples, refs, subject.cls),
        "identity_match": evaluator.identity_match(samples, subject),
    }


def class_quality(model, evaluator, cls: str, n: int, seed: int) -> dict:
    """Class recognition of class-prompt samples: the subject's class and the other classes."""
    from ...pairs import sample_images

    size = model.native_resolution
    seeds = list(range(seed, seed + n))
    acc = {}
    for c in render.CLASSES:
        images = sample_images(model, render.class_prompt(c), seeds, size, batch_size=16, **SAMPLING)
        acc[c] = evaluator.class_recognition(images, c)["accuracy"]
    others = [acc[c] for c in render.CLASSES if c != cls]
    return {"class_quality": acc[cls], "unrelated_quality": float(np.mean(others))}


def unet_vector(unet):
    import torch

    return torch.cat([p.detach().flatten().float() for p in unet.parameters()])


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
        from .. import load_evaluator, load_world_model

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
        """Drop the cached protected models (keep memory flat across subjects)."""
        self._protected.clear()

    # --------------------------------------------------------------------------------------
    def protected(self, subject: render.Subject, seed: int, overrides: dict):
        """(protected model, its CPU-seconds, its ProtectConfig) for this subject, seed and protection variant (cached).

        Pseudo-settings of the world (multi-subject rows): ``companions`` k protects k other subjects of the
        world in the same run (COMPANION_SEEDS, each with its own identifier); ``then_add`` m protects m
        more companions afterwards, starting from that model (a subject added to a protected model), with
        ``replay`` keeping the first run's subjects in the second and ``from_original`` giving the second
        round the world model as its reference (``reference_model``: anchor, targets, generated images);
        ``companion_class`` 'same' / 'other' picks companions of the subject's class only / of the others only;
        ``protect_seed`` gives the protection its own random stream (default: ``seed``, which the attack, the
        photos and the scoring keep): the same row, protected again with other draws; ``soup`` [s1, s2, ...]
        protects once per protect_seed s and averages the UNets (a weight average of the streams); ``delta_scale`` s
        takes the row without it and scales what the protection changed: world model + s x (protected - world).
        """
        from ...protection import protect

        if overrides.get("delta_scale") is not None:
            return self.delta_scaled(subject, seed, overrides)
        if overrides.get("soup"):
            return self.soup(subject, seed, overrides)

        # what the run depends on: one run for every attack seed that shares its protection stream
        pinned = {**overrides, "protect_seed": overrides.get("protect_seed", seed)}
        key = (subject.seed, json.dumps(pinned, sort_keys=True))
        if key not in self._protected:
            settings = {**self.protect_settings, **overrides}
            k, then_add, replay, original, kind, pseed = (
                settings.pop(n, d) for n, d in WORLD_SETTINGS.items()
            )
            picked = companions(k + then_add, subject.seed, subject.cls if kind else "", kind == "same")
            comps = list(zip(picked, COMPANION_IDS))
            start, seconds, members = self.model, 0.0, [(subject, render.IDENTIFIER), *comps[:k]]
            if then_add:
                first = {n: v for n, v in overrides.items() if n not in SECOND_ROUND}
                start, seconds, _ = self.protected(subject, seed, first)
                members = [*comps[k:], *(members if replay else [])]
            config, images, others = self.protect_config(members, seed if pseed is None else pseed, settings)
            reference = self.model if then_add and original else None
            result = protect(config, self.progress, self.should_stop, model=start, images=images, resume=True,
                             subject_images=others or None, reference=reference)  # fmt: skip
            self._protected[key] = (result.model, seconds + result.cpu_seconds, config)
        return self._protected[key]

    def soup(self, subject: render.Subject, seed: int, overrides: dict):
        """(the weight average of the row protected once per protect_seed of ``soup``, their seconds, the first
        run's ProtectConfig), cached like a protection."""
        key = (subject.seed, json.dumps(overrides, sort_keys=True))
        if key not in self._protected:
            rest = {n: v for n, v in overrides.items() if n != "soup"}
            runs = [self.protected(subject, seed, {**rest, "protect_seed": s}) for s in overrides["soup"]]
            self._protected[key] = (
                soup_model([m for m, _, _ in runs]),
                sum(t for _, t, _ in runs),
                runs[0][2],
            )
        return self._protected[key]

    def delta_scaled(self, subject: render.Subject, seed: int, overrides: dict):
        """(the world model + delta_scale x (the row without delta_scale - the world model), that row's seconds
        and ProtectConfig): the protection's change scaled, sharing the protection with the unscaled row; cached
        like a protection."""
        key = (subject.seed, json.dumps({"protect_seed": seed, **overrides}, sort_keys=True))
        if key not in self._protected:
            s = float(overrides["delta_scale"])
            rest = {n: v for n, v in overrides.items() if n != "delta_scale"}
            model, seconds, config = self.protected(subject, seed, rest)
            self._protected[key] = (soup_model([model, self.model], [s, 1 - s]), seconds, config)
        return self._protected[key]

    def protect_config(self, members: list, seed: int, settings: dict):
        """(ProtectConfig, photos, the other members' photos) protecting ``members`` ((subject, identifier)
        pairs; the first is the config's primary subject)."""
        from ...config import ProtectConfig

        (primary, ident), rest = members[0], members[1:]
        if settings.get("method") == "persguard":
            settings = self.persguard_settings(settings, primary)
        entries = [{"images": ["<world>"], "instance_prompt": render.instance_prompt(c.cls, i),
                    "class_prompt": render.class_prompt(c.cls)} for c, i in rest]  # fmt: skip
        config = ProtectConfig(model=str(self.model.source or "world"), instance_prompt=render.instance_prompt(primary.cls, ident),
                               class_prompt=render.class_prompt(primary.cls), cache_dir=self.cache_dir, seed=seed,
                               device="cpu", subjects=entries, **settings)  # fmt: skip
        photos = [render.photos(c, 4, start=PROTECTED_PHOTOS) for c, _ in rest]
        return config, render.photos(primary, 4, start=PROTECTED_PHOTOS), photos

    def attacker_photos(self, row: Row, subject: render.Subject, seed: int) -> list:
        """The 4 photos the attacker trains on: image-protected (row.images), then transformed."""
        photos = render.photos(subject, 4, start=row.photos)
        clean = list(photos)
        if row.images:
            photos = self.protected_photos(subject, seed, row.images)[0]
        if row.transform == "one_clean":
            photos = [clean[0]] + list(photos[1:])
        elif row.transform:
            from ...images.purify import TRANSFORMS

            photos = TRANSFORMS[row.transform][1](self.model, list(photos), 3000 + seed)
        return list(photos)

    def protected_photos(self, subject: render.Subject, seed: int, settings: dict):
        """(protected photos, per-photo metrics, CPU-seconds) of an image-level protection (cached)."""
        from ...images import ImageProtectConfig, protect_images

        key = ("images", subject.seed, seed, json.dumps(settings, sort_keys=True))
        if key not in self._protected:
            config = ImageProtectConfig(
                instance_prompt=render.instance_prompt(subject.cls),
                class_prompt=render.class_prompt(subject.cls),
                cache_dir=self.cache_dir,
                seed=seed,
                device="cpu",
                sample_steps=25,
                guidance_scale=4.0,
                sample_batch_size=16,
                save_every=0,
                **settings,
            )
            images = render.photos(subject, 4, start=PROTECTED_PHOTOS)
            result = protect_images(
                config, self.progress, self.should_stop, model=self.model, images=images, restart=True
            )
            self._protected[key] = (result.images, result.metrics, result.cpu_seconds)
        return self._protected[key]

    def persguard_settings(self, settings: dict, subject: render.Subject) -> dict:
        """The world's PersGuard settings for ``subject``: the target class's prompt, the erased scenes."""
        settings = dict(settings)
        if settings.get("target_prompt") == "{target}":
            settings["target_prompt"] = render.class_prompt(target_class(subject.cls))
        if settings.get("backdoor") == "erasure" and not settings.get("backdoor_images"):
            from ...fileio import atomic_write_bytes
            from ...pairs import default_cache_dir

            folder = Path(self.cache_dir or default_cache_dir()) / "world-erasure" / subject.name
            folder.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(render.photos(subject, 4, start=PROTECTED_PHOTOS, empty=True)):
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                atomic_write_bytes(folder / f"{i}.png", buf.getvalue())
            settings["backdoor_images"] = str(folder)
        return settings

    def before_attack(self, what: str, model, subject: render.Subject, seed: int):
        """The model after an attack on the protection itself: a recovery fine-tune (the attacker's recipe,
        RECOVERY_STEPS steps on photos of other individuals of the class or of the next class, with that
        class's prompt, no prior) or a weight round trip (fp16, int8)."""
        from ...attack import AttackConfig, run_attack
        from ...attack.roundtrip import ROUND_TRIPS, round_trip

        if what in ROUND_TRIPS:
            return dataclasses.replace(model, unet=round_trip(model.unet, what), _fingerprint=None)
        if what == "learn_other":  # the attacker's standard DreamBooth on the first companion
            other = companions(1, exclude=subject.seed)[0]
            prompts = {"instance_prompt": render.instance_prompt(other.cls, COMPANION_IDS[0]),
                       "class_prompt": render.class_prompt(other.cls), "identifier": COMPANION_IDS[0]}  # fmt: skip
            config = AttackConfig(
                cache_dir=self.cache_dir, seed=seed, device="cpu", **prompts, **self.attack_settings
            )
            photos = render.photos(other, 4, start=PROTECTED_PHOTOS)
            return run_attack(model, photos, config, self.progress, self.should_stop).model
        cls = subject.cls if what == "recover_class" else target_class(subject.cls)
        photos = [im for i in range(RECOVERY_INDIVIDUALS)
                  for im in render.photos(render.make_subject(RECOVERY_SEED + i, cls=cls), 4)]  # fmt: skip
        prompt = render.class_prompt(cls)
        settings = {
            **self.attack_settings,
            "steps": RECOVERY_STEPS,
            "prior_weight": 0.0,
            "num_class_images": 0,
        }
        config = AttackConfig(instance_prompt=prompt, class_prompt=prompt, identifier=cls, cache_dir=self.cache_dir,
                              seed=seed, device="cpu", **settings)  # fmt: skip
        return run_attack(model, photos, config, self.progress, self.should_stop).model

    def attack_config(self, subject: render.Subject, seed: int, overrides: dict):
        from ...attack import AttackConfig

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
            parts = [
                "v2",
                row.attack,
                row.photos,
                row.scratch,
                row.other_subject,
                self.attack_settings,
                subject_seed,
                seed,
                self.samples,
                self.model.fingerprint(),
                self.evaluator_id,
            ]
            if row.images or row.transform:  # (keys of the rows before these existed stay as they were)
                parts += [row.images, row.transform]
            if row.before:
                parts += ["before", row.before]
            if row.reset:
                parts += ["reset", row.reset]
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
        model, scorer = self._model_and_scorer(row, subject_seed, seed)
        if row.attack is None:
            return [scorer(model, instance_prompt(scorer.subject.cls, None), 0)]
        return self._attack_curve(row, model, scorer, seed, budgets)

    def _model_and_scorer(self, row: Row, subject_seed: int, seed: int):
        """The row's model before the attack (protected, from scratch, or the world model) and its Scorer."""
        subject = render.make_subject(subject_seed)
        model, protect_s, protect_config = self.model, 0.0, None
        quality_key: tuple = ("base", subject.cls, seed)
        if row.protect is not None:
            model, protect_s, protect_config = self.protected(subject, seed, row.protect)
            quality_key = (subject.seed, seed, json.dumps(row.protect, sort_keys=True))
        psnr = ssim = None
        if row.images:  # the photos' protection: its cost and how far the photos moved
            _, metrics, protect_s = self.protected_photos(subject, seed, row.images)
            psnr = float(np.mean([m["psnr"] for m in metrics]))
            ssim = float(np.mean([m["ssim"] for m in metrics]))
        if row.reset:
            model, quality_key = reset_model(model, seed, row.reset), ("reset", row.reset, subject.cls, seed)
        quality = self.quality(model, quality_key, subject.cls, seed)  # the model before any attack
        if row.scratch:
            model = scratch_model(model, seed)
        if row.before:
            model = self.before_attack(row.before, model, subject, seed)
        target = (
            render.make_subject(OTHER_SUBJECT + subject_seed, cls=subject.cls)
            if row.other_subject
            else subject
        )
        scorer = Scorer(self, row, subject_seed, seed, subject, target, quality, protect_s, protect_config, psnr,
                        ssim)  # fmt: skip
        return model, scorer

    def _attack_curve(self, row: Row, model, scorer: Scorer, seed: int, budgets: list[int]) -> list[Cell]:
        """One attack run to the largest budget, scored after each budget's number of steps."""
        from ...attack import run_attack

        config = self.attack_config(scorer.subject, seed, {**row.attack, "steps": max(budgets)})
        prompt = instance_prompt(scorer.subject.cls, row.attack)
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
            cells.append(scorer(view, text, at, t1 - t0 - paused[0], change))
            paused[0] += time.perf_counter() - t1

        images = self.attacker_photos(row, scorer.target, seed)
        run_attack(model, images, config, self.progress, self.should_stop, snapshot_steps=budgets,
                   on_snapshot=on_snapshot)  # fmt: skip
        return cells


@dataclass
class Scorer:
    """How the samples of one row's model become a Cell: the subject (or the other individual) and its
    reference photos, and what the row measured before the attack (quality, protection cost)."""

    runner: Runner
    row: Row
    subject_seed: int
    seed: int
    subject: render.Subject
    target: render.Subject  # whose photos the attacker has and the samples are compared with
    quality: dict
    protect_s: float
    protect_config: object  # the row's ProtectConfig (None: not protected)
    psnr: float | None
    ssim: float | None
    refs: list = field(default_factory=list)  # 8 photos of ``target`` nobody trained on

    def __post_init__(self) -> None:
        self.refs = render.photos(self.target, 8, start=REFERENCE_PHOTOS)

    def __call__(self, model, prompt: str, at: int, attack_s: float = 0.0, weight_change=None) -> Cell:
        from ...pairs import sample_images

        r = self.runner
        samples = sample_images(model, prompt, r.sample_seeds(self.seed), model.native_resolution, batch_size=16,
                                **SAMPLING)  # fmt: skip
        s = score_samples(r.evaluator, samples, self.target, self.refs)
        fired = method_success(self.protect_config, samples, WorldJudge(r.evaluator, self.subject.cls))
        if r.grids is not None:
            r.grids.mkdir(parents=True, exist_ok=True)
            name = f"{self.row.name}_s{self.subject_seed}_seed{self.seed}_{at}.png"
            render.grid(samples, cols=8).save(r.grids / name)
        q = self.quality
        return Cell(self.row.name, self.subject_seed, self.seed, s["similarity"], s["identity_match"],
                    q["class_quality"], q["unrelated_quality"], self.protect_s, attack_s, gated=s["gated"],
                    class_rate=s["class_rate"], steps=at, weight_change=weight_change, backdoor=fired,
                    psnr=self.psnr, ssim=self.ssim)  # fmt: skip


# the pseudo-settings of the multi-subject rows and of a replicated protection (Runner.protected) with their
# defaults; SECOND_ROUND's describe the second round, which the first round's settings leave out
WORLD_SETTINGS = {
    "companions": 0,
    "then_add": 0,
    "replay": False,
    "from_original": False,
    "companion_class": "",
    "protect_seed": None,
}
SECOND_ROUND = ("then_add", "replay", "from_original")


class WorldJudge:
    """What a method's success measure asks (``ProtectionMethod.success_rate``), answered by the demo
    world's evaluator: which share of the samples shows the subject's class, or what a prompt names."""

    def __init__(self, evaluator, cls: str) -> None:
        self.evaluator, self.cls = evaluator, cls

    def class_rate(self, samples) -> float:
        return self.evaluator.class_recognition(samples, self.cls)["accuracy"]

    def recognised(self, samples, prompt: str) -> float:
        return self.evaluator.class_recognition(samples, prompt.split()[-1])["accuracy"]


def method_success(config, samples, judge) -> float | None:
    """The protection method's own success measure on the trigger's samples (None: it has none, or the
    row is not protected): PersGuard's backdoor fired, for one."""
    if config is None:
        return None
    from ...methods import get_method

    return get_method(config.method).success_rate(samples, config, judge)


def view_prompt_map(view, config) -> dict[str, str]:
    """Textual inversion samples with its learned token; the other attacks use the prompt as is."""
    token = view.info.get("token")
    return {config.identifier: token} if token else {}
