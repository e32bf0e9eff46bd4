"""Benchmark single-file I/O on full-size SD checkpoints with random weights (CPU, no download).

Builds an SD1.5 / SD2.1-shaped checkpoint in the original layout from the shipped config
folders (the layout generator of the tests), then times detection, loading (diffusers'
single-file conversion) and export (no training: the output must equal the input byte for
byte), and prints peak memory. Needs about 2 GB of disk per fp16 file and ~10 GB of RAM.

    python tools/bench_checkpoint.py --types sd1 sd2-v --dtype fp16 --dir /tmp/apdm-bench
    python tools/bench_checkpoint.py --types sdxl --dtype fp16 --load-dtype fp16   # ~7 GB file, ~10 GB RAM
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ldm_layout import configs_from_folder, make_checkpoint  # noqa: E402
from safetensors import safe_open  # noqa: E402

from apdm_core.checkpoint import config_dir, detect_model_type, load_single_file, read_checkpoint  # noqa: E402
from apdm_core.detection import family_of  # noqa: E402
from apdm_core.export import export_single_file  # noqa: E402


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def identical(a: Path, b: Path) -> tuple[int, int]:
    same = total = 0
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        for k in fa.keys():
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            total += 1
            same += (
                x.dtype == y.dtype
                and x.shape == y.shape
                and x.reshape(-1).view(torch.uint8).equal(y.reshape(-1).view(torch.uint8))
            )
    return same, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=["sd1"], choices=["sd1", "sd2", "sd2-v", "sdxl", "sdxl-v"])
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument(
        "--load-dtype", choices=["fp16", "fp32"], default="fp32", help="dtype the model is loaded in"
    )
    ap.add_argument("--keep", action="store_true", help="keep the files (e.g. for a real-host check)")
    ap.add_argument("--dir", default="/tmp/apdm-bench")
    args = ap.parse_args()
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    for kind in args.types:
        src, out = root / f"{kind}.safetensors", root / f"{kind}-export.safetensors"
        for p in (src, out):
            p.unlink(missing_ok=True)
        meta = {"modelspec.prediction_type": "v"} if kind.endswith("-v") else None
        t0 = time.perf_counter()
        make_checkpoint(
            src, family_of(kind), dtype=dtype, configs=configs_from_folder(config_dir(kind)), metadata=meta
        )
        t_make = time.perf_counter() - t0
        t0 = time.perf_counter()
        det = detect_model_type(read_checkpoint(src))
        t_detect = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_dtype = torch.float16 if args.load_dtype == "fp16" else torch.float32
        model = load_single_file(src, dtype=load_dtype)  # auto-detected type and the shipped configs
        t_load = time.perf_counter() - t0
        n_unet = sum(p.numel() for p in model.unet.parameters())
        t0 = time.perf_counter()
        export_single_file(model, out)
        t_export = time.perf_counter() - t0
        same, total = identical(src, out)
        print(
            f"{kind}: {src.stat().st_size / 1e9:.2f} GB {args.dtype}, detected {det.model_type} ({'; '.join(det.reasons)}), "
            f"UNet {n_unet / 1e6:.0f}M params | make {t_make:.1f} s, detect {t_detect:.2f} s, load {t_load:.1f} s, "
            f"export {t_export:.1f} s | {same}/{total} tensors byte-identical | peak RSS {peak_gb():.1f} GB",
            flush=True,
        )
        del model
        for p in (src, out) if not args.keep else ():
            p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
