"""Benchmark the L2P protection loop: seconds per outer step, inner steps/s, peak memory, and the
projected time of the paper's 800 x 20 steps; the fast path (the engine, with the levers of
ProtectConfig) against the straightforward reference (perf_tools.ReferenceL2P) in one run.

    python benchmarks/bench_protect.py                                  # tiny UNet, fast vs reference
    python benchmarks/bench_protect.py --unet sd15-small --resolution 256 --inner 2 --outer 2
    python benchmarks/bench_protect.py --unet sd15 --resolution 512 --inner 20 --outer 3 --preset fast
    python benchmarks/bench_protect.py --sweep                          # every lever, one at a time
    python benchmarks/bench_protect.py --estimate --unet sd15 --resolution 512   # memory/FLOPs, no run
    python benchmarks/bench_protect.py --estimate --unet sdxl --resolution 1024  # SDXL (768 too), per preset
    python benchmarks/bench_protect.py --unet world --inner 20 --no-reference --threads 1 --set protect_every=2

The UNet is the real architecture with random weights (speed does not need trained weights):
'sd15' is Stable Diffusion 1.5's UNet (859.5M parameters), 'sd15-small' the same topology at a
quarter of the width (for CPUs), 'tiny' the test model, 'world' the shipped demo-world model
(its own VAE and text encoder; the loop the demo world's research runs, see README "Protection
that holds"). The VAE and the text encoder are tiny
(they run once per run in the fast path, every inner step in the reference); the subject,
positive and class images are procedural (their content does not change the speed).
Each measurement runs in a fresh subprocess so that peak memory (CUDA max allocated, or the
process's peak RSS on CPU) belongs to that measurement alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER_OUTER, PAPER_INNER = 800, 20
# One lever at a time on top of the defaults (fp32, everything on the device), then the presets.
SWEEP = [
    ("defaults", []),
    ("adamw_impl=loop", ["adamw_impl=loop"]),
    ("adamw_impl=fused", ["adamw_impl=fused"]),
    ("mixed_precision=bf16", ["mixed_precision=bf16"]),
    ("ref_precision=bf16", ["ref_precision=bf16"]),
    ("channels_last", ["channels_last=true"]),
    ("gradient_checkpointing", ["gradient_checkpointing=true"]),
    ("optimizer_in_backward", ["optimizer_in_backward=true"]),
    ("offload_outer", ["offload_outer=true"]),
    ("preset fast", ["preset=fast"]),
    ("preset low-memory", ["preset=low-memory"]),
]
# torch.compile is measured on its own (--set compile_unet=true): on a CPU its first step compiles
# C++ kernels for minutes.


# ------------------------------------------------------------------------------------------
# one measurement (runs in a child process)
# ------------------------------------------------------------------------------------------
def parse_sets(pairs: list[str]) -> tuple[str | None, dict]:
    """['preset=fast', 'channels_last=true', 'inner_steps=2'] -> ('fast', {...}) typed by the field."""
    import typing

    from apdm_core.config import ProtectConfig

    hints = typing.get_type_hints(ProtectConfig)
    preset, values = None, {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        if key == "preset":
            preset = raw
            continue
        if key not in hints:
            raise SystemExit(f"--set {pair}: {key} is not a ProtectConfig field")
        typ = hints[key]
        if typ is bool:
            values[key] = raw.lower() in ("1", "true", "yes", "on")
        elif typ in (int, float):
            values[key] = typ(raw)
        else:
            values[key] = raw
    return preset, values


def make_config(args, sets: list[str]):
    from apdm_core.config import ProtectConfig

    preset, values = parse_sets(sets)
    base = dict(outer_steps=args.outer + args.warmup, inner_steps=args.inner, resolution=args.resolution,
                num_class_images=4, device=args.device, seed=0, save_every=0)  # fmt: skip
    base.update(values)
    return ProtectConfig.from_preset(preset, **base) if preset else ProtectConfig(**base)


def procedural_images(n: int, size: int, seed: int):
    """``n`` photos of demo-world subjects at ``size`` px (their content does not change the speed)."""
    from PIL import Image

    from apdm_core.world import render

    return [render.photos(render.make_subject(seed + i), 1)[0].resize((size, size), Image.Resampling.BICUBIC)
            for i in range(n)]  # fmt: skip


def peak_memory(device) -> tuple[int, str]:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA max allocated"
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return int(kb) * 1024, "peak RSS (whole process)"


def measure(args, mode: str, sets: list[str]) -> dict:
    import torch
    from perf_tools import ReferenceL2P, bench_model, count_parameters

    from apdm_core.data import SubjectImage
    from apdm_core.l2p import L2PTrainer, encode_data
    from apdm_core.models import resolve_device

    config = make_config(args, sets)
    device = resolve_device(config.device)
    model = bench_model(args.unet).to(device)
    size = config.resolution or model.native_resolution
    subjects = [SubjectImage(f"subject_{i}", im) for i, im in enumerate(procedural_images(4, size, 0))]
    positives = procedural_images(4, size, 100)
    class_images = procedural_images(config.num_class_images, size, 200)
    if mode == "reference":
        runner = ReferenceL2P(config, model, subjects, positives, class_images, device)
    else:
        data = encode_data(config, model, subjects, positives, class_images)
        if device.type == "cuda":
            for m in (model.vae, *model.text_encoders):
                m.to("cpu")
        runner = L2PTrainer(config, model, data, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    # On a GPU the wall clock; on a CPU the process's CPU time, which a busy machine (other jobs
    # on the same cores) inflates far less than the wall clock. With --threads 1 it equals the wall
    # time the step would take on an idle core.
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times, walls = [], []
    for _ in range(config.outer_steps):
        t0, w0 = clock(), time.perf_counter()
        runner.outer_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(clock() - t0)
        walls.append(time.perf_counter() - w0)
    timed = sorted(times[args.warmup :])
    s_outer = timed[len(timed) // 2]  # the median: robust to a busy moment of the machine
    inner = max(config.inner_steps, 1)
    mem, mem_kind = peak_memory(device)
    return {
        "mode": mode,
        "variant": " ".join(sets) or "defaults",
        "unet": args.unet,
        "params": count_parameters(model.unet if mode == "reference" else runner.unet),
        "resolution": size,
        "device": str(device),
        "outer_timed": len(timed),
        "warmup": args.warmup,
        "inner_steps": config.inner_steps,
        "s_per_outer": s_outer,
        "s_per_outer_all": times,
        "wall_per_outer_all": walls,
        "clock": "wall" if device.type == "cuda" else "process CPU time",
        "inner_per_s": inner / s_outer,
        "projected_paper_s": s_outer / inner * PAPER_INNER * PAPER_OUTER,
        "peak_memory": mem,
        "memory_kind": mem_kind,
        "loss_protect": [h["loss_protect"] for h in runner.history],
        "loss_per": [h["loss_per"] for h in runner.history],
    }


# ------------------------------------------------------------------------------------------
# the parent: runs children, prints the table
# ------------------------------------------------------------------------------------------
def child(args, mode: str, sets: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--unet", args.unet, "--resolution", str(args.resolution),
           "--outer", str(args.outer), "--inner", str(args.inner), "--warmup", str(args.warmup),
           "--device", args.device, "--threads", str(args.threads)] + [x for s in sets for x in ("--set", s)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"mode": mode, "variant": " ".join(sets) or "defaults", "error": " | ".join(tail)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def combine(results: list[dict]) -> dict:
    """One row from the repeats of a variant: the median of all timed outer steps (and the min)."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    steps = sorted(t for r in ok for t in r["s_per_outer_all"][r["warmup"] :])
    row = dict(ok[0])
    row["s_per_outer"] = steps[len(steps) // 2]
    row["s_min"] = steps[0]
    row["samples"] = len(steps)
    row["peak_memory"] = max(r["peak_memory"] for r in ok)
    inner = max(row["inner_steps"], 1)
    row["inner_per_s"] = inner / row["s_per_outer"]
    row["projected_paper_s"] = row["s_per_outer"] / inner * PAPER_INNER * PAPER_OUTER
    return row


def fmt_time(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


def table(rows: list[dict], reference: dict | None) -> str:
    lines = [
        "| variant | s / outer step (median, min) | inner steps/s | speed-up vs reference | peak memory "
        "| projected 800 x 20 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} {r['variant']} | failed: {r['error']} | | | | |")
            continue
        name = "reference (straightforward)" if r["mode"] == "reference" else r["variant"]
        ratio = (
            reference["s_per_outer"] / r["s_per_outer"] if reference and "error" not in reference else None
        )
        lines.append(
            f"| {name} | {r['s_per_outer']:.3f} ({r.get('s_min', r['s_per_outer']):.3f}) | {r['inner_per_s']:.2f} | "
            f"{f'{ratio:.2f}x' if ratio else '-'} | {r['peak_memory'] / 2**30:.2f} GiB | "
            f"{fmt_time(r['projected_paper_s'])} |"
        )
    return "\n".join(lines)


def agreement(fast: dict, reference: dict) -> str:
    """How closely the fast path reproduced the reference's losses (the same computation)."""
    if "error" in fast or "error" in reference:
        return ""
    diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(fast["loss_protect"], reference["loss_protect"])]
    return f"max relative difference of the protection loss, {fast['variant']} vs reference: {max(diffs):.2e}"


def header(args, rows: list[dict]) -> str:
    ok = next((r for r in rows if "error" not in r), {})
    import torch

    cpu = platform.processor() or platform.machine()
    dev = ok.get("device", args.device)
    if dev.startswith("cuda") and torch.cuda.is_available():
        cpu = torch.cuda.get_device_name(0)
    return (
        f"{time.strftime('%Y-%m-%d')}  {cpu}  {os.cpu_count()} CPUs ({args.threads or 'default'} threads)  torch {torch.__version__}  "
        f"device {dev}\nUNet {args.unet} ({ok.get('params', 0) / 1e6:.1f}M parameters, random weights), "
        f"{ok.get('resolution', args.resolution)} px, {args.inner} inner steps x {args.outer} timed outer steps "
        f"(+{args.warmup} warm-up) x {args.repeat} repeats; clock: {ok.get('clock', '')}; tiny VAE and text encoder; projection = s/outer / inner x 20 x 800; "
        f"memory: {ok.get('memory_kind', '')}"
    )


def estimate(args) -> None:
    """Memory by the formula of perf_tools.estimate_memory (activations measured on the meta
    device) and FLOPs counted on the meta device, for every preset; nothing is run."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from perf_tools import (
        UNET_CONFIGS,
        estimate_memory,
        l2p_flops_per_inner_step,
        layer_parameter_counts,
        saved_activation_bytes,
    )

    from apdm_core.config import ProtectConfig

    diffusers_logging.set_verbosity_error()  # its note on casting meta modules is noise here
    if args.unet not in UNET_CONFIGS:
        raise SystemExit(f"--estimate needs --unet {', '.join(UNET_CONFIGS)}")
    cfg_unet = UNET_CONFIGS[args.unet]
    xl = args.unet.startswith("sdxl")
    res = args.resolution or (1024 if xl else 512)
    counts = layer_parameter_counts(cfg_unet)
    n = counts["all"]
    print(
        f"UNet {args.unet}: {n / 1e6:.1f}M parameters, {res} px, batch_size 1 (estimate, GiB; not measured)"
    )
    print("| preset | training state + activations | fits 24 GB | parts |")
    print("| --- | ---: | :---: | --- |")
    presets = ["paper", "fast", "low-memory", "low-memory-8bit", "family"] + (["sdxl-24gb"] if xl else [])
    for preset in presets:
        c = ProtectConfig.from_preset(preset)
        bf16 = c.mixed_precision == "bf16"
        act = saved_activation_bytes(cfg_unet, res, 3 * c.batch_size, torch.bfloat16 if bf16 else torch.float32,
                                     c.gradient_checkpointing)  # fmt: skip
        est = estimate_memory(
            n, c, act, n_attacked=counts[c.attacker_layers], n_protected=counts[c.protect_layers]
        )
        fits = "yes" if est.total < 22 * 2**30 else "no"  # ~2 GiB for the CUDA context and fragmentation
        print(
            f"| {preset} | {est.total / 2**30:.1f} | {fits} | {est.describe().split('(', 1)[1].rstrip(')')} |"
        )
    flops = l2p_flops_per_inner_step(cfg_unet, res, ProtectConfig())
    total = flops * PAPER_INNER * PAPER_OUTER
    print(f"\nFLOPs per inner step (torch.utils.flop_counter, meta device): {flops / 1e12:.2f} TFLOP; "
          f"800 x 20 = {total / 1e15:.0f} PFLOP")  # fmt: skip
    for name, peak in (
        ("H100 SXM bf16 dense, 989 TFLOP/s", 989e12),
        ("RTX 4090 bf16 dense, 165 TFLOP/s", 165e12),
    ):
        print(
            f"floor at 100% / 40% utilisation on {name}: {fmt_time(total / peak)} / {fmt_time(total / peak / 0.4)}"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--unet", default="tiny", choices=["tiny", "world", "sd15-small", "sd15", "sdxl-small", "sdxl"]
    )
    p.add_argument(
        "--resolution", type=int, default=0, help="pixels (multiple of 64); 0 = native (64 tiny, 512 sd15)"
    )
    p.add_argument("--outer", type=int, default=3, help="timed outer steps")
    p.add_argument("--inner", type=int, default=4, help="inner steps per outer step (the paper: 20)")
    p.add_argument("--warmup", type=int, default=1, help="untimed outer steps first")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per run (0 = torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a ProtectConfig field for the fast path (repeatable), or preset=NAME")  # fmt: skip
    p.add_argument("--preset", help="shorthand for --set preset=NAME")
    p.add_argument("--sweep", action="store_true", help="the reference, then every lever of SWEEP")
    p.add_argument("--repeat", type=int, default=1, help="run every variant this many times, interleaved")
    p.add_argument("--only", nargs="+", metavar="NAME", help="with --sweep: only these variants of SWEEP")
    p.add_argument("--no-reference", action="store_true", help="skip the reference run")
    p.add_argument("--estimate", action="store_true", help="memory estimate and FLOP count only")
    p.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    p.add_argument("--child", choices=["fast", "reference"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.preset:
        args.set.append(f"preset={args.preset}")
    if args.estimate:
        estimate(args)
        return 0
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(measure(args, args.child, args.set)))
        return 0
    sweep = [(name, sets) for name, sets in SWEEP if not args.only or name in args.only]
    variants = [sets + args.set for _, sets in sweep] if args.sweep else [args.set]
    jobs = ([] if args.no_reference else [("reference", [])]) + [("fast", sets) for sets in variants]
    runs: dict[int, list[dict]] = {i: [] for i in range(len(jobs))}
    for _ in range(args.repeat):  # interleaved, so that a busy minute of the machine hits every variant
        for i, (mode, sets) in enumerate(jobs):
            runs[i].append(child(args, mode, sets))
    rows = [combine(runs[i]) for i in range(len(jobs))]
    reference = None if args.no_reference else rows[0]
    print(header(args, rows))
    print(table(rows, reference))
    if reference:
        for r in rows[1:]:
            if "error" not in r and r["variant"] == "defaults":
                print(agreement(r, reference))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
