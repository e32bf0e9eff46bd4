"""The README's protection-comparison grid: per protection, the photos the attacker trains on and the
samples after the attack, from the sample grids that ``benchmarks/efficacy.py --grids DIR`` wrote.

    python benchmarks/comparison_grid.py --grids DIR --subject 1 --seed 0 --out docs/protection_comparison.png

The image-level protections are recomputed here (deterministic: the same photos the benchmark's
attacker had); a row whose grid is missing is skipped with a note.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROWS = (  # (label, efficacy row whose samples are shown, image protection of the photos or None)
    ("unprotected", "base+one_clean", None),  # clean photos: the standard attack's cell
    ("ASPL 8/255", "aspl+attack", "aspl"),
    ("LDU 8/255", "ldu+attack", "ldu"),
    ("ASPL 32/255", "aspl32+attack", "aspl32"),
    ("APDM (model)", "apdm+attack", None),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", required=True, help="the --grids folder of benchmarks/efficacy.py")
    ap.add_argument("--subject", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from PIL import Image, ImageDraw

    from apdm_core.images import ImageProtectConfig, protect_images
    from apdm_core.world import efficacy, load_world_model, render

    torch.set_num_threads(1)
    model = load_world_model()
    subject = render.make_subject(args.subject)
    clean = render.photos(subject, 4, start=efficacy.PROTECTED_PHOTOS)
    s, label_w = 64, 130  # 32-px images drawn at 2x
    rows = []
    for label, row, image_method in ROWS:
        grid = Path(args.grids) / f"{row}_s{args.subject}_seed{args.seed}_{args.steps}.png"
        if not grid.exists():
            print(f"skipped {label}: no {grid}")
            continue
        photos = clean
        if image_method:
            config = ImageProtectConfig(
                instance_prompt=render.instance_prompt(subject.cls), class_prompt=render.class_prompt(subject.cls),
                seed=args.seed, device="cpu", sample_steps=25, guidance_scale=4.0, sample_batch_size=16, save_every=0,
                **efficacy.IMAGE_SETTINGS[image_method],
            )  # fmt: skip
            photos = protect_images(config, model=model, images=clean, restart=True).images
        rows.append((label, photos, Image.open(grid).convert("RGB")))
    width, height = label_w + 4 * s + 16 + 8 * s, 24 + len(rows) * (2 * s + 8)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w, 4), "the 4 photos the attacker trains on", fill="black")
    draw.text((label_w + 4 * s + 16, 4), f"16 samples after {args.steps} DreamBooth steps", fill="black")
    for i, (label, photos, grid) in enumerate(rows):
        y = 24 + i * (2 * s + 8)
        draw.text((4, y + s - 6), label, fill="black")
        for j, p in enumerate(photos):
            canvas.paste(p.resize((s, s), Image.Resampling.NEAREST), (label_w + j * s, y + s // 2))
        canvas.paste(grid.resize((8 * s, 2 * s), Image.Resampling.NEAREST), (label_w + 4 * s + 16, y))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out, optimize=True)
    print(f"wrote {args.out} ({width} x {height})")


if __name__ == "__main__":
    main()
