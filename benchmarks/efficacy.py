"""Efficacy benchmark of protection on the demo world: does it stop DreamBooth, at what cost?

For each subject and seed it runs rows ``<model>+<attack>`` (``apdm_core.world.efficacy``):
models ``base`` (unprotected), ``scratch`` (the world model with a randomly initialised UNet:
what an attacker gets without our model), ``apdm`` (the demo preset), the paper's ablations
(``dpo_only``, ``naive``, ``reference_accum``, ``beta10``) and any ``--variant NAME=JSON``
(ProtectConfig overrides); attacks ``attack`` (the standard DreamBooth), ``identifier``,
``lr05x``/``lr2x``/``lr4x``, ``steps2x``, ``lora``, ``unseen_photos`` and ``other_subject``
(another individual of the class: utility). It prints one Markdown table at the standard budget
and, with ``--budgets``, the robustness curve (similarity after each number of attack steps,
from one attack run per cell) with the break-even budget, and writes the raw numbers as JSON.

Columns: ``gated similarity`` = the world evaluator's subject similarity of "a photo of <id>
<class>" samples to unseen photos of the subject, counting samples not recognised as the class
as 0 (mean over subjects x seeds, min-max); ``raw similarity`` = without the gate; ``class rate``
= share of those samples recognised as the class; ``efficiency`` = (unprotected - protected) /
(unprotected - scratch) gated similarity after the same attack (1 = the attacker gains nothing
over a random UNet, 0 = no protection); ``utility`` (``+other_subject`` rows) = gain on another
individual relative to the unprotected model's gain; ``class quality`` / ``unrelated quality`` =
share of class-prompt samples (the subject's class / the other classes) recognised as their
class, on the model before the attack; seconds of protection and of the attack.

    export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
    python benchmarks/efficacy.py                                  # core rows, subjects 1 2 3 x seeds 0 1 2
    python benchmarks/efficacy.py --rows base+attack scratch+attack --budgets 0 25 50 100 200 400 800 1600
    python benchmarks/efficacy.py --variant long='{"resync_every": 10}' --rows long+attack
    python benchmarks/efficacy.py --merge a.json b.json --plot curve.png   # one table from several runs
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from apdm_core.world import efficacy


def parse_variants(items: list[str]) -> dict[str, dict]:
    out = {}
    for item in items or []:
        name, _, text = item.partition("=")
        if not name or "+" in name or not text:
            raise SystemExit(
                f"--variant {item!r}: expected NAME=JSON (ProtectConfig overrides), NAME without '+'"
            )
        out[name] = json.loads(text)
    return out


def print_frontier(cells, attack_settings, variants, path: str) -> None:
    points = efficacy.frontier(cells, attack_settings, variants)
    if len(points) < 2:
        return
    print("\n| protected row | efficiency | class quality drop | unrelated quality drop | protect s |")
    print("|---|---|---|---|---|")
    for p in points:
        print(f"| {p['row']} | {p['efficiency']:.2f} | {p['class_drop']:.2f} | {p['unrelated_drop']:.2f} | "
              f"{p['protect_s']:.0f} |")  # fmt: skip
    if path:
        efficacy.plot_frontier(points, path)


def print_curves(cells, rows, standard: int) -> None:
    budgets = sorted({c.steps for c in cells if c.steps is not None})
    if len(budgets) < 2:
        return
    print("\nGated similarity after N attack steps (mean over subjects x seeds):\n")
    print("| row | " + " | ".join(str(b) for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for name in rows:
        points = efficacy.curve_points(cells, name)
        if len(points) < 2:
            continue
        vals = [
            f"{sum(c.score for c in points[b]) / len(points[b]):.3f}" if b in points else "" for b in budgets
        ]
        print(f"| {name} | " + " | ".join(vals) + " |")
    changes = [(n, efficacy.curve_points(cells, n)) for n in rows]
    for name, points in changes:
        wc = {b: [c.weight_change for c in v if c.weight_change is not None] for b, v in points.items()}
        wc = {b: sum(v) / len(v) for b, v in wc.items() if v}
        if len(wc) > 1:
            print(
                f"\nrelative UNet weight change, {name}: " + ", ".join(f"{b}: {v:.3f}" for b, v in wc.items())
            )
    for name in rows:
        if efficacy.unprotected_twin(name) and efficacy.curve_points(cells, name):
            s = efficacy.curve_summary(cells, name, standard)
            be = ", ".join("> max" if b is None else f"{b:.2f}x" for b in s["break_even"])
            exc = s["max_excess_over_scratch_2x"]
            print(f"\n{name}: break-even budget per subject/seed (x standard {standard}): {be}; "
                  f"largest excess over scratch up to 2x: {'' if exc is None else f'{exc:.3f}'}")  # fmt: skip


def print_best_of(cells, candidates, select_seed: int, standard: int) -> None:
    """Best of k protection runs: chosen by the attack of one seed, reported under the others."""
    picks = efficacy.best_of(cells, candidates, select_seed, standard)
    if not picks:
        return

    def f(v):
        return "" if v is None else f"{v:.2f}"

    print(f"\nBest of {len(candidates)} protection runs, chosen by attack seed {select_seed} (class within 0.10 of "
          "the unprotected model's, then the largest gap at 1x and 2x), reported under the other seeds "
          "(chosen / mean of the candidates / best candidate seen from the report seeds):\n")  # fmt: skip
    print(
        "| subject | chosen | gap / class at the choice (base class) | report seeds | efficiency 1x | gap 2x (unprotected - protected) | class quality |"
    )
    print("|---|---|---|---|---|---|---|")
    for p in picks:
        sel, ch, avg, best = (
            p["selection"][p["chosen"]],
            p["chosen_report"],
            p["average"],
            p["candidates"][p["oracle"]],
        )
        print(f"| {p['subject']} | {p['chosen']}{'' if p['kept_class'] else ' (none kept the class)'} | "
              f"{f(sel['gap'])} / {f(sel['class_quality'])} ({f(p['base_class_quality'])}) | "
              f"{' '.join(map(str, p['report_seeds']))} | "
              + " | ".join(f"{f(ch[k])} / {f(avg[k])} / {f(best[k])}" for k in ("efficiency", "gap_2x", "class_quality"))
              + " |")  # fmt: skip
    print("| mean | | | | " + " | ".join(
        f"{f(efficacy.report_mean([p['chosen_report'][k] for p in picks]))} / "
        f"{f(efficacy.report_mean([p['average'][k] for p in picks]))} / "
        f"{f(efficacy.report_mean([p['candidates'][p['oracle']][k] for p in picks]))}"
        for k in ("efficiency", "gap_2x", "class_quality")) + " |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, nargs="+", default=[1, 2, 3], help="world subject seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="protection/attack seeds")
    ap.add_argument("--rows", nargs="+", default=list(efficacy.CORE_ROWS),
                    help=f"rows to run, or 'all' (known: {', '.join(efficacy.ROWS)})")  # fmt: skip
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="a protection variant: ProtectConfig overrides on the demo preset; rows NAME+<attack>")  # fmt: skip
    ap.add_argument("--budgets", type=int, nargs="+", default=None,
                    help=f"attack steps at which to score (the robustness curve), e.g. {' '.join(map(str, efficacy.BUDGETS))}")  # fmt: skip
    ap.add_argument("--samples", type=int, default=16, help="samples per score")
    ap.add_argument("--outer-steps", type=int, default=None, help="override the protection's outer steps")
    ap.add_argument("--attack-steps", type=int, default=None, help="override the attack's standard steps")
    ap.add_argument(
        "--world",
        choices=["sd", "sdxl"],
        default="sd",
        help="the demo world's model: sd (SD1-shaped, the default) or sdxl (SDXL-shaped, assets/model_xl)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--results-cache", default="",
                    help="JSON file that keeps the cells of unprotected rows (base, scratch) across runs")  # fmt: skip
    ap.add_argument("--json", default="", help="write the cells and the summary here")
    ap.add_argument("--grids", default="", help="write a PNG grid of the scored samples of every cell here")
    ap.add_argument("--plot", default="", help="draw the robustness curve of the rows into this PNG")
    ap.add_argument("--frontier", default="",
                    help="draw efficiency vs quality drop and vs protection cost of the protected rows into this PNG")  # fmt: skip
    ap.add_argument("--sweep", action="store_true",
                    help="also run every attacker of the sweep (efficacy.SWEEP_ATTACKS) on each protected model of "
                         "--rows, and print the worst case per subject and seed")  # fmt: skip
    ap.add_argument("--recovery", action="store_true",
                    help="also run the attacks on the protection itself (efficacy.RECOVERY_ATTACKS: recovery "
                         "fine-tunes, fp16 / int8 weight round trips) on each protected model of --rows")  # fmt: skip
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="print one table from the cells of earlier --json files (parallel runs); runs nothing")  # fmt: skip
    ap.add_argument("--best-of", nargs="+", default=[], metavar="ROW",
                    help="protected rows that differ only in protect_seed: choose one per subject by the attack of "
                         "--select-seed and report it under the other seeds (best of k protection runs)")  # fmt: skip
    ap.add_argument("--select-seed", type=int, default=7, help="the attack seed that --best-of chooses by")
    args = ap.parse_args()
    variants = parse_variants(args.variant)
    attack_settings = {
        **efficacy.ATTACK_SETTINGS,
        **({"steps": args.attack_steps} if args.attack_steps else {}),
    }
    standard = attack_settings["steps"]
    if args.merge:
        cells, rows, worlds = [], [], set()
        for f in args.merge:
            data = json.loads(Path(f).read_text())
            worlds.add(data.get("args", {}).get("world", "sd"))
            if len(worlds) > 1:
                raise SystemExit(f"{f} was measured in another demo world ({', '.join(sorted(worlds))}); "
                                 "merge the files of one world at a time.")  # fmt: skip
            cells += efficacy.cells_from_dicts(data["cells"])
            variants.update(data.get("variants", {}))
            rows += [c.row for c in cells]
        rows = list(dict.fromkeys(rows))
        summary = efficacy.summarize(cells, attack_settings, variants)
        print(efficacy.markdown_table(summary))
        print_comparison(summary)
        print_curves(cells, rows, standard)
        print_worst_case(cells, rows, standard)
        print_best_of(cells, args.best_of, args.select_seed, standard)
        if args.plot:
            efficacy.plot_curves(cells, [r for r in rows if r != "base"], args.plot)
        print_frontier(cells, attack_settings, variants, args.frontier)
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = list(efficacy.ROWS) if args.rows == ["all"] else args.rows
    # the rows asked for and their twins get --budgets; what --sweep / --recovery add, their standard budget
    asked = set(rows) | {efficacy.twin(r, m) for r in rows for m in ("base", "scratch")} | {"base"}
    rows = with_sweep(rows, variants, args.sweep, args.recovery)
    for r in rows:
        try:
            efficacy.make_row(r, variants)
        except KeyError:
            raise SystemExit(
                f"unknown row {r!r}; known: {', '.join(efficacy.ROWS)} (or <variant>+<attack>)"
            ) from None
    for r in list(rows):  # a protected row needs its unprotected and from-scratch twins and the base row
        # (the comparison columns, photos changed before the attack, are read by their gap: no scratch twin)
        scratch = (
            efficacy.twin(r, "scratch")
            if r.partition("+")[2] not in efficacy.COMPARISON_ATTACKS[1:]
            else None
        )
        for need in ("base", efficacy.unprotected_twin(r), scratch):
            if need and need not in rows:
                rows.insert(0, need)
    rows = list(dict.fromkeys(rows))
    protect = {"outer_steps": args.outer_steps} if args.outer_steps else {}
    cache = os.environ.get("APDM_CACHE_DIR") or tempfile.mkdtemp(prefix="apdm_efficacy_")
    from apdm_core.world import load_world_model

    runner = efficacy.Runner(load_world_model(arch=args.world), samples=args.samples, cache_dir=cache, protect_settings=protect,
                             attack_settings=attack_settings, variants=variants,
                             results=args.results_cache or None, grids=args.grids or None)  # fmt: skip
    cells = []
    t0, c0 = time.perf_counter(), time.process_time()
    for subject in args.subjects:
        for seed in args.seeds:
            for name in rows:
                c1 = time.process_time()
                budgets = args.budgets if name in asked else None
                got = runner.run_curve(name, subject, seed, budgets)
                cells += got
                std = next(c for c in got if c.steps == runner.row(name).steps(attack_settings))
                print(f"subject {subject} seed {seed} {name}: gated {std.score:.3f} raw {std.similarity:.3f} "
                      f"class-rate {std.class_rate:.2f} quality {std.class_quality:.2f}/{std.unrelated_quality:.2f} "
                      f"curve {' '.join(f'{c.steps}:{c.score:.2f}' for c in got)} "
                      + (f"backdoor {' '.join(f'{c.steps}:{c.backdoor:.2f}' for c in got)} "
                         if std.backdoor is not None else "")
                      + f"({time.process_time() - c1:.0f} CPU-s)", flush=True)  # fmt: skip
                if args.json:  # after every row: a stopped run keeps what it measured
                    write_json(args.json, args, variants, cells, None, time.perf_counter() - t0,
                               time.process_time() - c0)  # fmt: skip
        runner.forget()  # one subject at a time in memory (its protections serve every attack seed)
    summary = efficacy.summarize(cells, attack_settings, variants)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print()
    print(efficacy.markdown_table(summary))
    print_comparison(summary)
    print_curves(cells, rows, standard)
    print_worst_case(cells, rows, standard)
    print_best_of(cells, args.best_of, args.select_seed, standard)
    print(f"\nsubjects {args.subjects} x seeds {args.seeds}; {args.samples} samples per score; "
          f"protection {runner.protect_settings}; variants {variants}; attack {runner.attack_settings}; "
          f"wall {wall:.0f} s, CPU {cpu:.0f} s, torch threads {torch.get_num_threads()}")  # fmt: skip
    if args.plot:
        efficacy.plot_curves(cells, [r for r in rows if r != "base"], args.plot)
    print_frontier(cells, runner.attack_settings, variants, args.frontier)
    if args.json:
        write_json(args.json, args, variants, cells, summary, wall, cpu)


def with_sweep(rows: list[str], variants: dict, sweep: bool, recovery: bool) -> list[str]:
    """``rows`` plus, for each protected model among them, its rows for every attacker of the sweep
    (``sweep``) and every attack on the protection itself (``recovery``)."""
    attacks = (efficacy.SWEEP_ATTACKS if sweep else ()) + (efficacy.RECOVERY_ATTACKS if recovery else ())
    models = [
        r.split("+", 1)[0] for r in rows if "+" in r and efficacy.make_row(r, variants).protect is not None
    ]
    extra = [f"{m}+{a}" for m in dict.fromkeys(models) for a in attacks]
    return list(dict.fromkeys([*rows, *extra]))


def print_worst_case(cells, rows, standard: int) -> None:
    models = dict.fromkeys(r.split("+", 1)[0] for r in rows if "+" in r and efficacy.unprotected_twin(r))
    for model in models:
        table = efficacy.markdown_worst_case(efficacy.worst_case(cells, model, standard))
        if table and sum(r.startswith(f"{model}+") for r in rows) > 1:
            print(f"\nEfficiency of {model} against the attacker sweep (efficiency per attacker where it learns the "
                  "subject on the unprotected model):\n")  # fmt: skip
            print(table)


def print_comparison(summary) -> None:
    table = efficacy.markdown_comparison(summary)
    if table:
        print(
            "\nProtection comparison: gated similarity after the attack (gap) per what happened to the photos:\n"
        )
        print(table)


def write_json(path, args, variants, cells, summary, wall: float, cpu: float) -> None:
    data = {"args": vars(args), "variants": variants, "summary": summary,
            "cells": efficacy.cells_to_dicts(cells), "wall_s": wall, "cpu_s": cpu}  # fmt: skip
    Path(path).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
