"""The face metrics ``face`` (identity similarity) and ``fdfr`` (face detection failure rate): dlib with
the models bundled by ``face_recognition_models``, optional (skipped with the install line when missing)."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from .metrics import MetricContext, MetricSkipped, register_metric


# ------------------------------------------------------------------------------------------
# face identity (dlib + the models bundled by face_recognition_models), optional
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_face_models():
    import importlib.util
    from pathlib import Path

    hint = (
        "face identity needs dlib and its bundled models: pip install dlib-bin face-recognition-models "
        "(both carry their weights; nothing is downloaded at run time)"
    )
    try:
        import dlib
    except ImportError as exc:
        raise MetricSkipped(hint) from exc
    spec = importlib.util.find_spec(
        "face_recognition_models"
    )  # located, not imported (it needs pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        raise MetricSkipped(hint)
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    detector = dlib.get_frontal_face_detector()
    shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
    return detector, shape, encoder


def face_embedding(image: Image.Image) -> np.ndarray | None:
    """128-d dlib embedding of the largest face, or None when no face is detected."""
    detector, shape, encoder = load_face_models()
    arr = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    faces = list(detector(arr, 1))
    if not faces:
        return None
    face = max(faces, key=lambda r: r.width() * r.height())
    return np.asarray(encoder.compute_face_descriptor(arr, shape(arr, face)), dtype=np.float64)


def _face_embeddings(ctx: MetricContext) -> tuple[list, list]:
    from .prompts import prompt_set_for

    if prompt_set_for(ctx.class_noun) != "person":
        raise MetricSkipped(f"face metrics apply to person subjects, not {ctx.class_noun!r}")
    if "face" not in ctx.cache:
        ctx.cache["face"] = (
            [face_embedding(im) for im in ctx.references],
            [face_embedding(im) for im in ctx.samples],
        )
    return ctx.cache["face"]


def face_identity(ctx: MetricContext) -> dict:
    """Cosine similarity of each detected generated face to the mean reference face (ISM-like)."""
    refs, gens = _face_embeddings(ctx)
    refs = [e for e in refs if e is not None]
    if not refs:
        return {"value": None, "reason": "no face detected in the reference images"}
    center = np.mean(refs, axis=0)
    sims = [float(e @ center / (np.linalg.norm(e) * np.linalg.norm(center))) for e in gens if e is not None]
    dists = [float(np.linalg.norm(e - center)) for e in gens if e is not None]
    if not sims:
        return {"value": None, "reason": "no face detected in any generated image (see fdfr)"}
    match = float(np.mean([d < 0.6 for d in dists]))  # dlib's usual same-person threshold
    return {"value": float(np.mean(sims)), "faces": len(sims), "match_rate": match, "per_face": sims}


def face_detection_failure(ctx: MetricContext) -> dict:
    """Fraction of generated images in which no face is detected (FDFR)."""
    _, gens = _face_embeddings(ctx)
    return {"value": float(np.mean([e is None for e in gens])), "images": len(gens)}


register_metric(
    "face",
    face_identity,
    protected_if="lower",
    description="face identity similarity to the reference faces (dlib)",
)
register_metric(
    "fdfr",
    face_detection_failure,
    protected_if="higher",
    description="face detection failure rate of the samples (dlib)",
)
