"""Dev check of the demo world (issue 5, phase 1): is it a world where protection can be measured?

1. Class recognition: base-model samples of "a photo of <class>" and "a photo of sks <class>",
   scored by the identity evaluator.
2. DreamBooth teaches a NEW subject: for a few public subjects (never seen in pretraining),
   subject similarity of "a photo of sks <class>" samples to held-out photos of the subject,
   before and after a DreamBooth attack (full UNet fine-tune on 4 photos with prior
   preservation, built on ``apdm_core.training.dreambooth_loss``).
3. Optionally (``--protect``), a short APDM protection of the first subject, then the same
   attack on the protected model.

This is a development check, not the official attack: ``apdm_core.attack`` (another issue)
owns that. Usage, from the repository root:

    HF_HUB_OFFLINE=1 python benchmarks/world_check.py --subjects 1 2 3 --protect
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from apdm_core.config import ProtectConfig
from apdm_core.loading import load_model
from apdm_core.models import SDModel
from apdm_core.pairs import ensure_class_images, sample_images
from apdm_core.progress import Tracker
from apdm_core.training import Diffusion, LatentBank, dreambooth_loss, make_forward
from apdm_core.world import load_evaluator, load_world_model, render

SAMPLE = {"steps": 25, "guidance": 4.0}


def dreambooth_dev_attack(
    model: SDModel,
    images,
    instance_prompt: str,
    class_prompt: str,
    *,
    steps: int,
    lr: float,
    class_images: int,
    cache_dir: str,
    batch_size: int = 2,
    seed: int = 0,
    progress=None,
) -> SDModel:
    """DreamBooth (UNet full fine-tune, prior preservation weight 1) on ``model``; returns a new SDModel."""
    size = model.native_resolution
    prior_images = ensure_class_images(model, class_prompt, class_images, size=size, seed=seed,
                                       cache_dir=cache_dir, batch_size=16, **SAMPLE)  # fmt: skip
    unet = copy.deepcopy(model.unet).train().requires_grad_(True)
    subject = LatentBank(*model.encode_images(images))
    prior = LatentBank(*model.encode_images(prior_images))
    embeds = model.encode_prompts([instance_prompt, class_prompt])
    diffusion, forward = Diffusion(model.noise_scheduler()), make_forward(model.device)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    tracker = Tracker("attack", steps, progress)
    for _ in range(steps):
        loss = dreambooth_loss(unet, forward, diffusion, subject, embeds[:1], g, batch_size, prior,
                               embeds[1:], 1.0)  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tracker.update(losses={"loss": float(loss.detach())})
    unet.eval().requires_grad_(False)
    return SDModel(
        unet, model.vae, model.text_encoder, model.tokenizer, model.scheduler, model.source, model.kind
    )


def score(model: SDModel, evaluator, subject: render.Subject, refs, n: int, seed: int = 1000) -> dict:
    """Samples of the instance prompt vs the subject's reference photos; class prompt recognition."""
    size = model.native_resolution
    inst = sample_images(model, render.instance_prompt(subject.cls), list(range(seed, seed + n)), size,
                         batch_size=16, **SAMPLE)  # fmt: skip
    cls = sample_images(model, render.class_prompt(subject.cls), list(range(seed, seed + n)), size,
                        batch_size=16, **SAMPLE)  # fmt: skip
    return {
        "similarity": round(evaluator.subject_similarity(inst, refs), 4),
        "identity_match": round(evaluator.identity_match(inst, subject), 4),
        "instance_class_acc": evaluator.class_recognition(inst, subject.cls)["accuracy"],
        "class_prompt_acc": evaluator.class_recognition(cls, subject.cls)["accuracy"],
        "class_prompt_similarity": round(evaluator.subject_similarity(cls, refs), 4),
        "_images": inst,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=300, help="attack steps")
    ap.add_argument("--lr", type=float, default=2e-4, help="attack learning rate")
    ap.add_argument("--class-images", type=int, default=50)
    ap.add_argument("--samples", type=int, default=16, help="images per score")
    ap.add_argument("--protect", action="store_true", help="also protect the first subject, then attack it")
    ap.add_argument("--outer-steps", type=int, default=40)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--lr-protect", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--model", default="", help="world model folder (default: the shipped one)")
    ap.add_argument("--evaluator", default="", help="evaluator file (default: the shipped one)")
    ap.add_argument("--skip-classes", action="store_true", help="skip the class recognition part")
    ap.add_argument("--out", default="", help="folder for sample grids and results.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    out = Path(args.out or tempfile.mkdtemp(prefix="world_check_"))
    out.mkdir(parents=True, exist_ok=True)
    cache = str(out / "cache")
    model = load_model(args.model) if args.model else load_world_model()
    evaluator = load_evaluator(args.evaluator or None)
    results: dict = {"args": vars(args), "classes": {}, "subjects": {}}

    for cls in () if args.skip_classes else render.CLASSES:
        seeds = list(range(16))
        base = sample_images(
            model, render.class_prompt(cls), seeds, model.native_resolution, batch_size=16, **SAMPLE
        )
        inst = sample_images(
            model, render.instance_prompt(cls), seeds, model.native_resolution, batch_size=16, **SAMPLE
        )
        results["classes"][cls] = {
            "class_prompt": evaluator.class_recognition(base, cls),
            "sks_prompt": evaluator.class_recognition(inst, cls),
        }
        render.grid(base + inst).save(out / f"base_{cls}.png")
        print(cls, json.dumps(results["classes"][cls]), flush=True)

    for sid in args.subjects:
        subject = render.make_subject(sid)
        train = render.photos(subject, 4)
        refs = render.photos(subject, 8, start=100)  # held-out photos of the subject
        row = {"subject": subject.describe() + f", outline {subject.outline}"}
        before = score(model, evaluator, subject, refs, args.samples)
        attacked = dreambooth_dev_attack(model, train, render.instance_prompt(subject.cls),
                                         render.class_prompt(subject.cls), steps=args.steps, lr=args.lr,
                                         class_images=args.class_images, cache_dir=cache)  # fmt: skip
        after = score(attacked, evaluator, subject, refs, args.samples)
        render.grid(train + before.pop("_images") + after.pop("_images")).save(out / f"subject_{sid}.png")
        row.update(refs_self=round(evaluator.subject_similarity(train, refs), 4), base=before, attacked=after)
        if args.protect and sid == args.subjects[0]:
            folder = out / f"subject_{sid}"
            folder.mkdir(exist_ok=True)
            for i, im in enumerate(train):
                im.save(folder / f"{i:02d}.png")
            config = ProtectConfig(
                model=str(model.source), images=[str(folder)], instance_prompt=render.instance_prompt(subject.cls),
                class_prompt=render.class_prompt(subject.cls), outer_steps=args.outer_steps,
                inner_steps=args.inner_steps, lr_protect=args.lr_protect, lr_personalize=args.lr,
                num_class_images=args.class_images, sample_steps=SAMPLE["steps"],
                guidance_scale=SAMPLE["guidance"], sample_batch_size=16, cache_dir=cache, device="cpu",
                save_every=0,
            )  # fmt: skip
            from apdm_core.progress import tqdm_callback
            from apdm_core.protection import protect

            tp, cp = time.perf_counter(), time.process_time()
            result = protect(config, progress=tqdm_callback("protect"), model=model)
            row["protect_seconds"] = {
                "wall": round(time.perf_counter() - tp),
                "cpu": round(time.process_time() - cp),
            }
            row["protect_last"] = result.history[-1]
            prot = result.model
            prot_before = score(prot, evaluator, subject, refs, args.samples)
            prot_attacked = dreambooth_dev_attack(prot, train, render.instance_prompt(subject.cls),
                                                  render.class_prompt(subject.cls), steps=args.steps, lr=args.lr,
                                                  class_images=args.class_images, cache_dir=cache)  # fmt: skip
            prot_after = score(prot_attacked, evaluator, subject, refs, args.samples)
            render.grid(train + prot_before.pop("_images") + prot_after.pop("_images")).save(
                out / f"subject_{sid}_protected.png"
            )
            row.update(protected=prot_before, protected_attacked=prot_after)
        results["subjects"][sid] = row
        print(sid, json.dumps(row), flush=True)

    results["seconds"] = {"wall": round(time.perf_counter() - t0), "cpu": round(time.process_time() - c0)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"results and grids in {out}")


def print_table(results: dict) -> None:
    print("\nclass recognition of base samples (16 per class): class prompt / sks prompt")
    for cls, r in results["classes"].items():
        print(f"  {cls:5s} {r['class_prompt']['accuracy']:.2f} / {r['sks_prompt']['accuracy']:.2f}")
    print("\nsubject similarity of 'a photo of sks <class>' samples to held-out photos (identity match)")
    for sid, r in results["subjects"].items():
        line = f"  subject {sid} ({r['subject']}): refs {r['refs_self']:.3f}  base {r['base']['similarity']:.3f} "
        line += f"({r['base']['identity_match']:.2f})  attacked {r['attacked']['similarity']:.3f} ({r['attacked']['identity_match']:.2f})"
        if "protected_attacked" in r:
            line += f"  protected {r['protected']['similarity']:.3f}  protected+attacked "
            line += f"{r['protected_attacked']['similarity']:.3f} ({r['protected_attacked']['identity_match']:.2f})"
        print(line)
    print(f"\n{results['seconds']}")


if __name__ == "__main__":
    main()
