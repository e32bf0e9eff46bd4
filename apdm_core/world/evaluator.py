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


class IdentityNet(nn.Module):
    """Four conv stages (32 -> 4 px), global average pooling, one linear head per attribute."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.width = width
        self.features = nn.Sequential(
            *block(3, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.MaxPool2d(2),
            *block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({a: nn.Linear(4 * w, len(v)) for a, v in render.ATTRIBUTES.items()})

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

    @torch.no_grad()
    def predict(self, images, batch: int = 256) -> dict[str, torch.Tensor]:
        """Probabilities per attribute: {attribute: (N, n_values)}."""
        x = images_to_tensor(images)
        out: dict[str, list[torch.Tensor]] = {a: [] for a in render.ATTRIBUTES}
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
        is_cls = (probs["cls"].argmax(1) == render.CLASSES.index(cls)).float()
        return {
            "similarity": float(per_image.mean()),
            "class_rate": float(is_cls.mean()),
            "gated": float((per_image * is_cls).mean()),
        }

    def class_recognition(self, images, cls: str) -> dict[str, float]:
        """Fraction recognised as ``cls`` and the mean probability of ``cls``."""
        p = self.predict(images)["cls"]
        k = render.CLASSES.index(cls)
        return {"accuracy": float((p.argmax(1) == k).float().mean()), "prob": float(p[:, k].mean())}

    def identity_match(self, images, subject: render.Subject) -> float:
        """Fraction of identity attributes predicted equal to the subject's true values."""
        probs = self.predict(images)
        hits = [
            (probs[a].argmax(1) == render.ATTRIBUTES[a].index(getattr(subject, a))).float()
            for a in render.IDENTITY_ATTRIBUTES
        ]
        return float(torch.stack(hits).mean())


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
    net = IdentityNet(int(metadata.get("width", 32)))
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


def train_evaluator(
    subjects: int = 2000,
    photos: int = 3,
    steps: int = 2000,
    batch: int = 64,
    lr: float = 3e-3,
    width: int = 32,
    seed: int = 0,
    heldout_subjects: int = 200,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> tuple[Evaluator, dict]:
    """Train an IdentityNet on fresh individuals (namespace 'evaluator'); report held-out accuracy."""
    from .pretrain import render_dataset

    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = render_dataset("evaluator", subjects, photos, seed, progress, should_stop)
    labels = {a: torch.tensor([data.subjects[o].labels()[a] for o in data.owner]) for a in render.ATTRIBUTES}
    x_all = images_to_tensor(data.images)
    net = IdentityNet(width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    tracker = Tracker("evaluator", steps, progress, should_stop)
    net.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        out = net(augment(x_all[idx], g))
        loss = sum(F.cross_entropy(out[a], labels[a][idx]) for a in render.ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        tracker.update(losses={"loss": losses[-1]})
    evaluator = Evaluator(net.eval())
    report = heldout_report(evaluator, subjects=heldout_subjects, seed=seed)
    report.update(
        train={"subjects": subjects, "photos": photos, "steps": steps, "batch": batch, "lr": lr,
               "width": width, "seed": seed, "final_loss": float(np.mean(losses[-50:]))},
        wall_s=round(time.perf_counter() - t0, 1), cpu_s=round(time.process_time() - c0, 1),
    )  # fmt: skip
    evaluator.metadata = {"width": width, **report}
    return evaluator, report


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
