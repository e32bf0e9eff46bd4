"""The numbers of the table from the cells: standard cells, efficiency, gap, utility, the robustness
curve, the break-even budget and the protection-vs-quality-vs-cost frontier."""

from __future__ import annotations

import dataclasses

import numpy as np

from .cells import Cell
from .rows import RECOVERY_ATTACKS, SWEEP_ATTACKS, Row, make_row


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
            mine = [
                dataclasses.replace(c, class_quality=b.class_quality, unrelated_quality=b.unrelated_quality)
                if b
                else c
                for c, b in zip(mine, bases)
            ]

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


def cell_at(cells: list[Cell], row: str | None, subject: int, seed: int, steps) -> Cell | None:
    """The cell of ``row`` for (subject, seed) after ``steps`` attack steps (None where not measured)."""
    return next((c for c in cells if c.row == row and c.subject == subject and c.seed == seed
                 and c.steps == steps), None)  # fmt: skip


def utility_ratios(cells: list[Cell], name: str, base_name: str) -> list[float]:
    """(after - before) of row ``name`` / (after - before) of ``base_name``, per (subject, seed).

    "before" is the 0-step cell of the curve (the model before the attack); rows run without
    budget 0 have none and give no ratio.
    """

    ratios = []
    for c in cells:
        if c.row != name or c.steps in (0, None):
            continue
        before, b_after = (
            cell_at(cells, name, c.subject, c.seed, 0),
            cell_at(cells, base_name, c.subject, c.seed, c.steps),
        )
        b_before = cell_at(cells, base_name, c.subject, c.seed, 0)
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
        target = next(
            (
                x.score
                for x in cells
                if x.row == base_twin and (x.subject, x.seed) == c and x.steps == standard
            ),
            None,
        )
        if target is None:
            continue
        curve = sorted(
            (x.steps, x.score)
            for x in cells
            if x.row == name and (x.subject, x.seed) == c and x.steps is not None
        )
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
            s = next(
                (
                    x.score
                    for x in cells
                    if x.row == scratch and x.subject == c.subject and x.seed == c.seed and x.steps == c.steps
                ),
                None,
            )
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
        out.append(
            {
                "row": name,
                "efficiency": entry["efficiency"],
                "class_drop": float(np.mean([b.class_quality - c.class_quality for c, b in mine])),
                "unrelated_drop": float(
                    np.mean([b.unrelated_quality - c.unrelated_quality for c, b in mine])
                ),
                "protect_s": entry["protect_s"],
            }
        )
    return out


# ------------------------------------------------------------------------------------------
# the attacker sweep: the worst case per subject and seed
# ------------------------------------------------------------------------------------------
LEARNS = 0.1  # an unprotected attack that gains less than this over the unattacked model learns nothing
MARGIN = (
    0.1  # where the pretrained model is not learned this much better than a random one, the ratio is noise
)


def efficiency_at(cells: list[Cell], name: str, subject: int, seed: int, steps: int) -> float | None:
    """(unprotected - protected) / (unprotected - scratch) after ``steps`` of the row's attack, for one
    subject and seed; None where that attack does not learn the subject on the unprotected model (it
    gains less than LEARNS over the unattacked model) or about as well from scratch (margin <= MARGIN)."""

    def at(row: str | None, n: int) -> float | None:
        c = cell_at(cells, row, subject, seed, n)
        return None if c is None else c.score

    prot, base, scratch = at(name, steps), at(unprotected_twin(name), steps), at(twin(name, "scratch"), steps)
    before = at(unprotected_twin(name), 0)
    if before is None:
        before = at("base", 0)
    if (
        None in (prot, base, scratch)
        or base - scratch <= MARGIN
        or (before is not None and base - before < LEARNS)
    ):
        return None
    return (base - prot) / (base - scratch)


def worst_case(cells: list[Cell], model: str, standard: int, attacks=None) -> list[dict]:
    """Per (subject, seed) of the protected model ``model``: the efficiency of every attack of the sweep
    at its standard budget, of the standard attack at 2x and 4x its budget, and the worst of them."""
    attacks = attacks or (*SWEEP_ATTACKS, *RECOVERY_ATTACKS)
    out = []
    for subject, seed in sorted({(c.subject, c.seed) for c in cells if c.row.startswith(f"{model}+")}):
        effs: dict[str, float] = {}
        for attack in attacks:
            name = f"{model}+{attack}"
            steps = row_of(name).steps()
            e = efficiency_at(cells, name, subject, seed, steps)
            if e is not None:
                effs[attack] = e
        for factor in (2, 4):
            e = efficiency_at(cells, f"{model}+attack", subject, seed, factor * standard)
            if e is not None:
                effs[f"attack@{factor}x"] = e
        if not effs:
            continue
        worst = min(effs, key=effs.get)
        out.append({"subject": subject, "seed": seed, "efficiency": effs, "worst": effs[worst], "worst_row": worst,
                    "standard": effs.get("attack"), "at_2x": effs.get("attack@2x"), "at_4x": effs.get("attack@4x")})  # fmt: skip
    return out


def best_of(
    cells: list[Cell], candidates: list[str], select_seed: int, standard: int, class_margin=0.10
) -> list[dict]:
    """Best of k protection runs, chosen by one attack and reported under the others, per subject.

    ``candidates`` are protected rows of one attack that differ only in the protection's random stream
    (variants with their own ``protect_seed``). The choice sees only the cells of ``select_seed``: among
    the candidates whose class quality is within ``class_margin`` of the unprotected model's, the one whose
    attack learns the least, i.e. the largest mean gap (unprotected - protected gated similarity) at the
    standard budget and at twice it; where none keeps the class, the one that keeps it best (ties: the gap). The other
    seeds report the choice (efficiency at the standard budget; at 2x, where a random UNet learns the subject
    too and the efficiency is ill-conditioned, the gap itself; class quality) beside the mean over all
    candidates, which is what one protection run gives on average, and the best candidate seen from those
    seeds (by efficiency).
    """

    def gap_at(name: str, subject: int, seed: int, steps: int) -> float | None:
        base = cell_at(cells, unprotected_twin(name), subject, seed, steps)
        prot = cell_at(cells, name, subject, seed, steps)
        return None if base is None or prot is None else base.score - prot.score

    def gap(name: str, subject: int, seed: int) -> float | None:
        return report_mean([gap_at(name, subject, seed, n) for n in (standard, 2 * standard)])

    def quality(name: str, subject: int, seed: int) -> float | None:
        return next((c.class_quality for c in cells if c.row == name and c.subject == subject and c.seed == seed
                     and c.class_quality is not None), None)  # fmt: skip

    def report(name: str, subject: int, seeds: list[int]) -> dict:
        return {"efficiency": report_mean([efficiency_at(cells, name, subject, s, standard) for s in seeds]),
                "gap_2x": report_mean([gap_at(name, subject, s, 2 * standard) for s in seeds]),
                "class_quality": report_mean([quality(name, subject, s) for s in seeds])}  # fmt: skip

    out = []
    for subject in sorted({c.subject for c in cells if c.row in candidates}):
        selection = {n: {"gap": gap(n, subject, select_seed), "class_quality": quality(n, subject, select_seed)}
                     for n in candidates}  # fmt: skip
        seen = [n for n in candidates if selection[n]["gap"] is not None]
        others = sorted(
            {c.seed for c in cells if c.subject == subject and c.row in candidates} - {select_seed}
        )
        if not seen or not others:
            continue
        floor = quality("base", subject, select_seed)
        kept = [
            n for n in seen if floor is None or (selection[n]["class_quality"] or 0.0) >= floor - class_margin
        ]
        chosen = (max(kept, key=lambda n: selection[n]["gap"]) if kept
                  else max(seen, key=lambda n: (selection[n]["class_quality"] or 0.0, selection[n]["gap"])))  # fmt: skip
        reports = {n: report(n, subject, others) for n in seen}
        average = {
            k: report_mean([r[k] for r in reports.values()])
            for k in ("efficiency", "gap_2x", "class_quality")
        }
        oracle = max(
            seen, key=lambda n: reports[n]["efficiency"] if reports[n]["efficiency"] is not None else -np.inf
        )
        out.append({"subject": subject, "chosen": chosen, "kept_class": bool(kept), "report_seeds": others,
                    "selection": {n: selection[n] for n in seen},
                    "base_class_quality": floor, "candidates": reports, "chosen_report": reports[chosen],
                    "average": average, "oracle": oracle})  # fmt: skip
    return out


def report_mean(values: list) -> float | None:
    """The mean of the values that were measured (None where none was)."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
