"""Efficacy benchmark of APDM on the demo world: does protection stop DreamBooth, at what cost?

For each subject and seed it runs the rows of ``apdm_core.world.efficacy.ROWS``: the base
model, the unprotected DreamBooth attack, APDM-protected + the same attack, the paper's
ablations (DPO without L2P, the naive loss, the released code's accumulation, beta 10) and
attackers the protection did not simulate (another identifier, 2x learning rate, 2x steps,
LoRA, photos the protection never saw). It prints one Markdown table and writes the raw
numbers as JSON.

Columns: ``similarity`` = the world evaluator's subject similarity of "a photo of <id> <class>"
samples to unseen photos of the subject (mean over subjects x seeds, min-max); ``gap`` =
(protected-attack - base) / (unprotected-attack - base) similarity per subject and seed:
0 = the attack learned nothing, 1 = no protection; ``class quality`` / ``unrelated quality``
= fraction of class-prompt samples (the subject's class / the other classes) recognised as
their class, on the model before the attack; seconds of protection and of the attack.

    HF_HUB_OFFLINE=1 python benchmarks/efficacy.py                      # core rows, 3 subjects x 3 seeds
    HF_HUB_OFFLINE=1 python benchmarks/efficacy.py --rows all --seeds 0  # every row, one seed
    python benchmarks/efficacy.py --merge a.json b.json                  # one table from several runs
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from apdm_core.world import efficacy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, nargs="+", default=[1, 2, 3], help="world subject seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="protection/attack seeds")
    ap.add_argument("--rows", nargs="+", default=list(efficacy.CORE_ROWS),
                    help=f"rows to run, or 'all' (known: {', '.join(efficacy.ROWS)})")  # fmt: skip
    ap.add_argument("--samples", type=int, default=16, help="samples per score")
    ap.add_argument("--outer-steps", type=int, default=None, help="override the protection's outer steps")
    ap.add_argument("--attack-steps", type=int, default=None, help="override the attack's steps")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--json", default="", help="write the cells and the summary here")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="print one table from the cells of earlier --json files (parallel runs); runs nothing")  # fmt: skip
    args = ap.parse_args()
    if args.merge:
        cells = [
            c for f in args.merge for c in efficacy.cells_from_dicts(json.loads(Path(f).read_text())["cells"])
        ]
        print(efficacy.markdown_table(efficacy.summarize(cells)))
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = list(efficacy.ROWS) if args.rows == ["all"] else args.rows
    unknown = [r for r in rows if r not in efficacy.ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(efficacy.ROWS)}")
    for r in rows:  # a protected row needs its unprotected twin and the base row for the gap
        for need in ("base", efficacy.unprotected_twin(r)):
            if need and need not in rows:
                rows.insert(0, need)
    rows = list(dict.fromkeys(sorted(rows, key=list(efficacy.ROWS).index)))
    protect = {"outer_steps": args.outer_steps} if args.outer_steps else {}
    attack = {"steps": args.attack_steps} if args.attack_steps else {}
    cache = os.environ.get("APDM_CACHE_DIR") or tempfile.mkdtemp(prefix="apdm_efficacy_")
    runner = efficacy.Runner(samples=args.samples, cache_dir=cache, protect_settings=protect,
                             attack_settings=attack)  # fmt: skip
    cells = []
    t0, c0 = time.perf_counter(), time.process_time()
    for subject in args.subjects:
        for seed in args.seeds:
            for name in rows:
                cell = runner.run(efficacy.ROWS[name], subject, seed)
                cells.append(cell)
                print(f"subject {subject} seed {seed} {name}: similarity {cell.similarity:.3f} "
                      f"class {cell.class_quality:.2f} unrelated {cell.unrelated_quality:.2f}", flush=True)  # fmt: skip
            runner.forget()  # one subject/seed at a time in memory
    summary = efficacy.summarize(cells)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print()
    print(efficacy.markdown_table(summary))
    print(f"\nsubjects {args.subjects} x seeds {args.seeds}; {args.samples} samples per score; "
          f"protection {runner.protect_settings}; attack {runner.attack_settings}; "
          f"wall {wall:.0f} s, CPU {cpu:.0f} s, torch threads {torch.get_num_threads()}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary,
                                               "cells": efficacy.cells_to_dicts(cells),
                                               "wall_s": wall, "cpu_s": cpu}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
