"""The world's identity evaluator: the toy counterpart of DINO / face-identity similarity.

A small CNN, trained on rendered photos (``apdm world train-evaluator``), predicts every
attribute of an individual: its class and its identity (colour, pattern, pattern colour,
outline). From those predictions it gives

- ``subject_similarity(generated, references)``: the mean cosine similarity between the
  identity embeddings of generated images and of a subject's reference photos. The embedding
  concatenates the predicted distributions of the identity attributes (scaled so that, for
  confident predictions, the cosine is the fraction of identity attributes that agree: 1 = the
  same individual, about 0.2 = a random individual of the class);
- ``class_recognition(images, cls)``: the fraction of images recognised as ``cls`` and the
  mean probability of ``cls`` (for class prompts);
- ``identity_match(images, subject)``: the fraction of identity attributes predicted equal to
  the subject's true ones (the world knows them).

The shipped weights are ``assets/evaluator.safetensors``; their held-out accuracy (on
individuals of a namespace never used in training) is stored in the file's metadata and in
the model card.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import InputError
from ..progress import ProgressCallback, StopCheck, Tracker
from . import EVALUATOR_PATH, render

OBJECT = "object"  # the head that tells a photo of an object from a degenerate sample (noise, blobs)


class IdentityNet(nn.Module):
    """Four conv stages (32 -> 4 px), global average pooling, one linear head per attribute
    (and, with ``object_head``, one that tells an object of the world from a degenerate image)."""

    def __init__(self, width: int = 32, object_head: bool = False) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.width = width
        self.features = nn.Sequential(
            *block(3, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            nn.MaxPool2d(2),
            *block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(4 * w, len(v)) for a, v in render.ATTRIBUTES.items()})
        if object_head:
            self.heads[OBJECT] = nn.Linear(4 * w, 2)  # 0 = degenerate, 1 = an object of the world

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {a: head(h) for a, head in self.heads.items()}


def images_to_tensor(images) -> torch.Tensor:
    """PIL images (any size) or a uint8 (N, H, W, 3) array -> (N, 3, 32, 32) in [-1, 1]."""
    if isinstance(images, np.ndarray):
        arr = images
    else:
        arr = np.stack(
            [
                np.asarray(
                    im.convert("RGB").resize((render.SIZE, render.SIZE), Image.Resampling.BICUBIC)
                    if im.size != (render.SIZE, render.SIZE)
                    else im.convert("RGB")
                )
                for im in images
            ]
        )
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Evaluator:
    """Scores images of the world with a trained IdentityNet (CPU is plenty)."""

    def __init__(self, net: IdentityNet, metadata: dict | None = None) -> None:
        self.net = net.eval()
        self.metadata = metadata or {}

    @property
    def has_object_head(self) -> bool:
        return OBJECT in self.net.heads

    @torch.no_grad()
    def predict(self, images, batch: int = 256) -> dict[str, torch.Tensor]:
        """Probabilities per attribute: {attribute: (N, n_values)} (and "object": (N, 2) when trained)."""
        x = images_to_tensor(images)
        out: dict[str, list[torch.Tensor]] = {a: [] for a in self.net.heads}
        for i in range(0, len(x), batch):
            for a, logits in self.net(x[i : i + batch]).items():
                out[a].append(logits.softmax(-1))
        return {a: torch.cat(v) for a, v in out.items()}

    def attributes(self, images) -> list[dict[str, str]]:
        """The most likely value of every attribute, per image."""
        probs = self.predict(images)
        n = len(next(iter(probs.values())))
        return [{a: render.ATTRIBUTES[a][int(p[i].argmax())] for a, p in probs.items()} for i in range(n)]

    def embed(self, images) -> torch.Tensor:
        """Identity embeddings (N, D), unit norm; cosine of two = soft fraction of agreeing attributes."""
        return identity_embedding(self.predict(images))

    def subject_similarity(self, generated, references) -> float:
        """Mean pairwise cosine similarity of identity embeddings (as DINO similarity is computed)."""
        return float((self.embed(generated) @ self.embed(references).T).mean())

    def subject_scores(self, generated, references, cls: str) -> dict[str, float]:
        """Similarity of generated images to a subject's photos, with and without the class gate.

        - ``similarity``: ``subject_similarity`` (mean pairwise cosine, as DINO similarity);
        - ``class_rate``: fraction of the generated images recognised as ``cls``;
        - ``gated``: the per-image similarity, counted as 0 for an image not recognised as ``cls``,
          averaged. Degenerate samples (noise, blobs) get attribute predictions that agree with any
          subject by chance (raw similarity about 0.3 for an untrained UNet, above the 0.22 of
          another individual of the class); gated, they score 0, so "learned nothing useful" can
          never look like "learned the subject partly".
        """
        probs = self.predict(generated)
        per_image = (identity_embedding(probs) @ self.embed(references).T).mean(1)
        is_cls = recognised(probs, cls).float()
        return {
            "similarity": float(per_image.mean()),
            "class_rate": float(is_cls.mean()),
            "gated": float((per_image * is_cls).mean()),
        }

    def class_recognition(self, images, cls: str) -> dict[str, float]:
        """Fraction recognised as ``cls`` and the mean probability of ``cls``."""
        probs = self.predict(images)
        k = render.CLASSES.index(cls)
        return {
            "accuracy": float(recognised(probs, cls).float().mean()),
            "prob": float(probs["cls"][:, k].mean()),
        }

    def identity_match(self, images, subject: render.Subject) -> float:
        """Fraction of identity attributes predicted equal to the subject's true values."""
        probs = self.predict(images)
        hits = [
            (probs[a].argmax(1) == render.ATTRIBUTES[a].index(getattr(subject, a))).float()
            for a in render.IDENTITY_ATTRIBUTES
        ]
        return float(torch.stack(hits).mean())


def recognised(probs: dict[str, torch.Tensor], cls: str) -> torch.Tensor:
    """Per image: predicted as ``cls`` and (with an object head) as an object, not a degenerate sample."""
    ok = probs["cls"].argmax(1) == render.CLASSES.index(cls)
    if OBJECT in probs:
        ok &= probs[OBJECT][:, 1] >= 0.5
    return ok


def identity_embedding(probs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unit-norm concatenation of the identity attributes' predicted distributions (``Evaluator.embed``)."""
    k = len(render.IDENTITY_ATTRIBUTES)
    return F.normalize(torch.cat([probs[a] / math.sqrt(k) for a in render.IDENTITY_ATTRIBUTES], dim=1), dim=1)


def load_evaluator(path: str | Path | None = None) -> Evaluator:
    """The shipped evaluator (or one written by ``apdm world train-evaluator --out``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path else EVALUATOR_PATH
    if not path.exists():
        raise InputError(
            f"{path} does not exist; train the evaluator with `apdm world train-evaluator --out {path}`."
        )
    with safe_open(str(path), "pt") as f:
        metadata = json.loads((f.metadata() or {}).get("apdm", "{}"))
    net = IdentityNet(int(metadata.get("width", 32)), bool(metadata.get("object_head", False)))
    net.load_state_dict(load_file(str(path)))
    return Evaluator(net, metadata)


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------
def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Photometric + geometric jitter and the softness of generated images (blur, noise)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    shift = torch.randint(-2, 3, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=shift, dims=(-2, -1))
    gain = 1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1)
    bias = 0.1 * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    x = x * gain + bias
    sigma = float(torch.rand((), generator=g)) * 1.2
    if sigma > 0.2:
        r = torch.arange(-2, 3, dtype=torch.float32)
        k = torch.exp(-(r**2) / (2 * sigma**2))
        k = k / k.sum()
        x = F.conv2d(
            F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3
        )
        x = F.conv2d(
            F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3
        )
    x = x + 0.04 * float(torch.rand((), generator=g)) * torch.randn(x.shape, generator=g)
    return x.clamp(-1.2, 1.2)


def degenerate_images(n: int, seed: int, model=None) -> np.ndarray:
    """``n`` images that are no object of the world (uint8, N x 32 x 32 x 3): smooth colour noise at
    random scales, photos cut into shuffled 8 px tiles, and (with the world ``model``) samples of
    randomly initialised copies of its UNet, what an untrained or destroyed model draws."""
    rng = np.random.default_rng([7, seed])
    out = []
    kinds = 3 if model is not None else 2
    for i in range(n):
        kind = i % kinds
        if kind == 0:  # smooth colour noise
            cells = int(rng.choice([2, 3, 4, 6, 8, 16]))
            img = np.stack([render._smooth_field(rng, render.SIZE, cells) for _ in range(3)], -1)
            img = 127.5 + img * rng.uniform(40, 127) + rng.uniform(-60, 60, 3)
            out.append(np.clip(img, 0, 255).astype(np.uint8))
        elif kind == 1:  # shuffled tiles of a photo: its colours, no object
            subject = render.make_subject(int(rng.integers(1 << 30)), "evaluator")
            photo = np.asarray(render.render(subject, rng))
            tiles = [photo[y : y + 8, x : x + 8] for y in range(0, 32, 8) for x in range(0, 32, 8)]
            order = rng.permutation(len(tiles))
            rows = [np.concatenate([tiles[order[r * 4 + c]] for c in range(4)], 1) for r in range(4)]
            out.append(np.concatenate(rows, 0))
        else:
            out.append(None)  # filled below, in batches
    if model is not None:
        missing = [i for i, im in enumerate(out) if im is None]
        out_arr = list(out)
        for start in range(0, len(missing), 64):
            chunk = missing[start : start + 64]
            for i, im in zip(chunk, _random_unet_samples(model, len(chunk), seed * 1000 + start)):
                out_arr[i] = im
        out = out_arr
    return np.stack(out)


def _random_unet_samples(model, n: int, seed: int) -> list[np.ndarray]:
    from ..pairs import sample_images
    from .efficacy import SAMPLING, scratch_model

    random_model = scratch_model(model, 20_000 + seed)  # never the efficacy benchmark's scratch seeds
    prompts = [
        render.instance_prompt(render.CLASSES[seed % 4]),
        render.class_prompt(render.CLASSES[(seed + 1) % 4]),
    ]
    images = sample_images(
        random_model, prompts[seed % 2], list(range(seed, seed + n)), render.SIZE, batch_size=64, **SAMPLING
    )
    return [np.asarray(im.convert("RGB")) for im in images]


def vae_round_trip(model, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """``images`` encoded and decoded by the world model's VAE (the softness every generated sample has)."""
    vae = model.vae
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            y = vae.decode(vae.encode(x).latent_dist.mean).sample
            out.append(((y.clamp(-1, 1) + 1) * 127.5 + 0.5).byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def train_evaluator(
    subjects: int = 2000,
    photos: int = 3,
    steps: int = 2000,
    batch: int = 64,
    lr: float = 3e-3,
    width: int = 32,
    seed: int = 0,
    heldout_subjects: int = 200,
    degenerate: int = 3000,
    model=None,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> tuple[Evaluator, dict]:
    """Train an IdentityNet on fresh individuals (namespace 'evaluator'); report held-out accuracy.

    With ``degenerate`` > 0 it also learns the "object" head: the photos (and, with the world
    ``model``, the same photos after a VAE round trip, so that the softness of generated images is
    no cue) are objects; ``degenerate_images`` are not. The attribute heads learn from photos only.
    """
    from .pretrain import render_dataset

    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = render_dataset("evaluator", subjects, photos, seed, progress, should_stop)
    images = data.images
    owner = data.owner
    if degenerate and model is not None:  # every photo once more, as the VAE gives it back
        images = np.concatenate([images, vae_round_trip(model, data.images)])
        owner = np.concatenate([owner, owner])
    labels = {a: torch.tensor([data.subjects[o].labels()[a] for o in owner]) for a in render.ATTRIBUTES}
    x_all = images_to_tensor(images)
    x_bad = images_to_tensor(degenerate_images(degenerate, seed, model)) if degenerate else None
    net = IdentityNet(width, object_head=bool(degenerate))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    tracker = Tracker("evaluator", steps, progress, should_stop)
    net.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        if x_bad is None:
            out = net(augment(x_all[idx], g))
            loss = sum(F.cross_entropy(out[a], labels[a][idx]) for a in render.ATTRIBUTES)
        else:  # a quarter of the batch degenerate: only the object head learns from those
            bad = torch.randint(0, len(x_bad), (batch // 4,), generator=g)
            out = net(augment(torch.cat([x_all[idx], x_bad[bad]]), g))
            loss = sum(F.cross_entropy(out[a][:batch], labels[a][idx]) for a in render.ATTRIBUTES)
            is_object = torch.cat(
                [torch.ones(batch, dtype=torch.long), torch.zeros(len(bad), dtype=torch.long)]
            )
            loss = loss + F.cross_entropy(out[OBJECT], is_object)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        tracker.update(losses={"loss": losses[-1]})
    evaluator = Evaluator(net.eval())
    report = heldout_report(evaluator, subjects=heldout_subjects, seed=seed)
    if x_bad is not None:
        report["object"] = object_report(evaluator, seed, model)
    recipe = {"subjects": subjects, "photos": photos, "steps": steps, "batch": batch, "lr": lr, "width": width,
              "seed": seed, "degenerate": degenerate, "vae_round_trip": model is not None}  # fmt: skip
    report.update(
        train={**recipe, "final_loss": float(np.mean(losses[-50:]))},
        wall_s=round(time.perf_counter() - t0, 1),
        cpu_s=round(time.process_time() - c0, 1),
    )
    evaluator.metadata = {"width": width, "object_head": bool(degenerate), **report}
    return evaluator, report


def object_report(evaluator: Evaluator, seed: int, model=None, n: int = 192) -> dict:
    """How the object head judges images it never saw: held-out photos (should be objects), fresh
    degenerate images of another seed (should not) and, with the world model, its class-prompt
    samples (generated objects: most should pass)."""
    from .pretrain import render_dataset

    photos = render_dataset("heldout", n // 4, 4, seed + 1).images
    bad = degenerate_images(n, seed + 12345, model)
    out = {
        "photos_accepted": round(float((evaluator.predict(photos)[OBJECT][:, 1] >= 0.5).float().mean()), 4),
        "degenerate_rejected": round(float((evaluator.predict(bad)[OBJECT][:, 1] < 0.5).float().mean()), 4),
    }
    if model is not None:
        from ..pairs import sample_images
        from .efficacy import SAMPLING

        samples = [
            im
            for c in render.CLASSES
            for im in sample_images(
                model,
                render.class_prompt(c),
                list(range(5000, 5000 + n // 4)),
                render.SIZE,
                batch_size=48,
                **SAMPLING,
            )
        ]
        out["base_samples_accepted"] = round(
            float((evaluator.predict(samples)[OBJECT][:, 1] >= 0.5).float().mean()), 4
        )
    return out


def heldout_report(evaluator: Evaluator, subjects: int = 200, photos: int = 4, seed: int = 0) -> dict:
    """Accuracy on individuals never seen in training (namespace 'heldout'), and identity separation.

    - ``accuracy``: per attribute, on every held-out photo;
    - ``same_subject`` / ``other_subject``: mean subject similarity between two photos of the same
      individual, and of two individuals of the same class;
    - ``verification_auc``: how often a same-individual pair scores above a different-individual
      pair of the same class (1 = perfect separation);
    - ``identification``: top-1 accuracy of matching a photo to the right one of ``subjects``
      individuals by its similarity to their other photos.
    """
    from .pretrain import render_dataset

    data = render_dataset("heldout", subjects, photos, seed)
    probs = evaluator.predict(data.images)
    accuracy = {}
    for a in render.ATTRIBUTES:
        truth = torch.tensor([data.subjects[o].labels()[a] for o in data.owner])
        accuracy[a] = round(float((probs[a].argmax(1) == truth).float().mean()), 4)
    emb = evaluator.embed(data.images).view(subjects, photos, -1)
    query, refs = emb[:, 0], emb[:, 1:]
    sim = torch.einsum("qd,srd->qsr", query, refs).mean(-1)  # (query subject, reference subject)
    same = sim.diag()
    classes = torch.tensor([render.CLASSES.index(s.cls) for s in data.subjects])
    same_class = (classes[:, None] == classes[None, :]) & ~torch.eye(subjects, dtype=torch.bool)
    other = sim[same_class]
    auc = float((same[:, None] > other[None, :]).float().mean())
    return {
        "heldout": {"subjects": subjects, "photos": photos, "namespace": "heldout"},
        "accuracy": accuracy,
        "same_subject": round(float(same.mean()), 4),
        "other_subject": round(float(other.mean()), 4),
        "verification_auc": round(auc, 4),
        "identification": round(float((sim.argmax(1) == torch.arange(subjects)).float().mean()), 4),
    }


def save_evaluator(evaluator: Evaluator, path: str | Path, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    from ..fileio import atomic_path

    path = Path(path)
    state = {k: v.contiguous() for k, v in evaluator.net.state_dict().items()}
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(state, str(tmp), metadata={"apdm": json.dumps(evaluator.metadata)})
    return path
