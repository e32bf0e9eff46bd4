"""The demo world's procedural 'photos': classes, individual subjects, poses and prompts.

Pure numpy + PIL, fully determined by seeds. A *class* is a shape kind (ball, box, star, kite).
An *individual* (a subject) is one fixed identity of a class: a body colour, a pattern of a
second colour, an outline, and fine details that no prompt describes (exact tint, stripe
count and angle, spot layout). A photo renders that identity in a random pose (position,
scale, rotation), on a random background, under random lighting, as photos of one person
vary. Any number of new individuals can be drawn from seeds.

Seed namespaces keep the populations apart: ``make_subject(seed)`` (the public subjects,
``apdm world subject --seed N``) never coincides with the individuals drawn for pretraining
or for training the identity evaluator, which use their own namespaces.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # px, the world's native resolution
CLASSES = ("ball", "box", "star", "kite")
COLORS = {
    "red": (214, 38, 38),
    "orange": (245, 135, 20),
    "yellow": (242, 218, 40),
    "green": (40, 165, 60),
    "cyan": (30, 200, 215),
    "blue": (35, 70, 215),
    "purple": (135, 45, 185),
    "pink": (245, 125, 195),
}
COLOR_NAMES = tuple(COLORS)
PATTERNS = ("stripes", "spots", "cap", "center")  # each covers well under half of the body
OUTLINES = ("none", "dark", "light")  # never named in prompts: identity a prompt cannot describe
# The attributes that make an identity, with their values (the evaluator has one head each).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "cls": CLASSES,
    "color": COLOR_NAMES,
    "pattern": PATTERNS,
    "pattern_color": COLOR_NAMES,
    "outline": OUTLINES,
}
IDENTITY_ATTRIBUTES = ("color", "pattern", "pattern_color", "outline")  # subject similarity
IDENTIFIER = "sks"  # the DreamBooth identifier: in the vocabulary, never in a pretraining prompt
FILLER_WORDS = ("a", "photo", "of", "with", "the", "and", "toy", "picture")
VOCABULARY = (*FILLER_WORDS, IDENTIFIER, *CLASSES, *COLOR_NAMES, *PATTERNS)

_NAMESPACES = {"subject": 1, "pretrain": 2, "evaluator": 3, "heldout": 4}


def _rng(*key: int | str) -> np.random.Generator:
    """A generator seeded by a tuple of ints/strings (strings hashed stably)."""
    ints = [k if isinstance(k, int) else zlib.crc32(str(k).encode()) for k in key]
    return np.random.default_rng([abs(int(i)) for i in ints])


@dataclass(frozen=True)
class Subject:
    """One individual: a fixed identity that every photo of it shares."""

    seed: int
    namespace: str
    cls: str
    color: str
    pattern: str
    pattern_color: str
    outline: str
    tint: tuple[int, int, int]  # fine details below: identity no prompt names
    stripes: int
    pattern_angle: float  # radians, in the body frame
    spots: tuple[tuple[float, float], ...]
    aspect: float  # body width / height

    @property
    def name(self) -> str:
        return f"{self.namespace}{self.seed}"

    def labels(self) -> dict[str, int]:
        """Index of each attribute value (the evaluator's training targets)."""
        return {a: ATTRIBUTES[a].index(getattr(self, a)) for a in ATTRIBUTES}

    def describe(self) -> str:
        """The full descriptive prompt (what pretraining captions say at most)."""
        return f"a photo of {self.color} {self.cls} with {self.pattern_color} {self.pattern}"

    def to_dict(self) -> dict:
        return asdict(self)


def make_subject(seed: int, namespace: str = "subject", cls: str | None = None) -> Subject:
    """The individual with this seed (in a population namespace); ``cls`` forces its class."""
    if namespace not in _NAMESPACES:
        raise ValueError(f"namespace {namespace!r} is not one of {', '.join(_NAMESPACES)}")
    rng = _rng(_NAMESPACES[namespace], seed)
    klass = str(rng.choice(CLASSES))
    if cls is not None:
        if cls not in CLASSES:
            raise ValueError(f"class {cls!r} is not one of {', '.join(CLASSES)}")
        klass = cls
    color = int(rng.integers(len(COLOR_NAMES)))
    pattern_color = (color + 1 + int(rng.integers(len(COLOR_NAMES) - 1))) % len(COLOR_NAMES)
    spots = _spot_layout(klass, int(rng.integers(2, 5)), rng)
    return Subject(
        seed=int(seed),
        namespace=namespace,
        cls=klass,
        color=COLOR_NAMES[color],
        pattern=str(rng.choice(PATTERNS)),
        pattern_color=COLOR_NAMES[pattern_color],
        outline=str(rng.choice(OUTLINES)),
        tint=tuple(int(v) for v in rng.integers(-18, 19, 3)),
        stripes=int(rng.integers(2, 4)),
        pattern_angle=float(rng.uniform(-np.pi / 2, np.pi / 2)),
        spots=spots,
        aspect=float(rng.uniform(0.85, 1.15)),
    )


# ------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------
def _body(cls: str) -> np.ndarray:
    """Outline of the class shape in a unit body frame, (N, 2), y down."""
    if cls == "ball":
        a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(a), np.sin(a)], 1)
    if cls == "box":
        return np.array([[-0.82, -0.82], [0.82, -0.82], [0.82, 0.82], [-0.82, 0.82]])
    if cls == "star":
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.05, 0.45)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if cls == "kite":
        return np.array([[0.0, -1.05], [0.62, -0.2], [0.0, 1.05], [-0.62, -0.2]])
    raise ValueError(f"unknown class {cls!r}")


def _inside(point: np.ndarray, poly: np.ndarray) -> bool:
    """Point-in-polygon (ray casting)."""
    x, y = point
    inside = False
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def _spot_layout(cls: str, count: int, rng: np.random.Generator) -> tuple[tuple[float, float], ...]:
    """``count`` well separated spot centres inside the (shrunk) body of the class."""
    inner = _body(cls) * (0.55 if cls == "star" else 0.72)
    spots: list[np.ndarray] = []
    for _ in range(200):
        p = rng.uniform(-0.8, 0.8, 2)
        if _inside(p, inner) and all(np.hypot(*(p - q)) > 0.5 for q in spots):
            spots.append(p)
            if len(spots) == count:
                break
    return tuple((float(x), float(y)) for x, y in spots)


def _rot(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _pattern_shapes(s: Subject) -> list[np.ndarray]:
    """Polygons of the pattern in the body frame (clipped to the body when composited)."""
    if s.pattern == "center":
        return [_body(s.cls) * 0.45]
    if s.pattern == "spots":
        a = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        disc = np.stack([np.cos(a), np.sin(a)], 1) * (0.17 if s.cls == "star" else 0.22)
        return [disc + np.array(c) for c in s.spots]
    rot = _rot(s.pattern_angle)
    if s.pattern == "cap":  # the part of the body beyond a line, about a third of it
        return [np.array([[0.28, -2], [2, -2], [2, 2], [0.28, 2]]) @ rot.T]
    # stripes: ``stripes`` narrow parallel bands across the body, centred
    width, gap = 0.2, 0.68
    bands = []
    for k in range(s.stripes):
        u0 = (k - (s.stripes - 1) / 2) * gap - width / 2
        bands.append(np.array([[u0, -2], [u0 + width, -2], [u0 + width, 2], [u0, 2]]) @ rot.T)
    return bands


def _mask(polys: list[np.ndarray], size: int, width: int = 0) -> np.ndarray:
    """Coverage in [0, 1] at ``size`` px of polygons given in 2x supersampled coordinates."""
    im = Image.new("L", (2 * size, 2 * size), 0)
    d = ImageDraw.Draw(im)
    for p in polys:
        pts = [tuple(map(float, q)) for q in p]
        if width:
            d.line(pts + [pts[0]], fill=255, width=width, joint="curve")
        else:
            d.polygon(pts, fill=255)
    return np.asarray(im.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _smooth_field(rng: np.random.Generator, size: int, cells: int = 4) -> np.ndarray:
    """Low-frequency noise in [-1, 1] (a bilinear upsampled random grid)."""
    grid = Image.fromarray(((rng.uniform(-1, 1, (cells, cells)) + 1) * 127.5).astype(np.uint8))
    return np.asarray(grid.resize((size, size), Image.Resampling.BILINEAR), np.float32) / 127.5 - 1.0


def render(subject: Subject, rng: np.random.Generator, size: int = SIZE, empty: bool = False) -> Image.Image:
    """One photo of ``subject`` in a pose, background and lighting drawn from ``rng``.

    ``empty``: the same photo with the subject left out (the same random draws): the scene alone.
    """
    ss = 2 * size  # shapes are drawn 2x supersampled, then averaged down (antialiasing)
    # pose
    radius = rng.uniform(0.25, 0.38) * ss
    margin = radius * 1.05
    center = rng.uniform(margin, ss - margin, 2)
    angle = rng.uniform(-0.5, 0.5)
    scale = np.array([subject.aspect, 1.0 / subject.aspect]) * radius
    to_image = lambda p: (p * scale) @ _rot(angle).T + center  # noqa: E731
    # background: a muted colour, a lighting gradient and soft texture
    bg = (rng.uniform(55, 185) + rng.uniform(-25, 25, 3)).astype(np.float32)
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size - 0.5
    grad = rng.uniform(-60, 60, 2).astype(np.float32)
    field = grad[0] * xx + grad[1] * yy + 14 * _smooth_field(rng, size)
    img = bg + field[..., None]
    # body, pattern, outline
    body = _mask([to_image(_body(subject.cls))], size)[..., None]
    pattern = _mask([to_image(p) for p in _pattern_shapes(subject)], size)[..., None] * body
    tint = np.array(subject.tint, np.float32)
    body_rgb = np.clip(np.array(COLORS[subject.color], np.float32) + tint, 0, 255)
    pattern_rgb = np.clip(np.array(COLORS[subject.pattern_color], np.float32) + tint, 0, 255)
    if empty:
        body = pattern = np.zeros_like(body)
    img += (body_rgb - img) * body
    img += (pattern_rgb - img) * pattern
    if subject.outline != "none" and not empty:
        line = _mask([to_image(_body(subject.cls))], size, width=max(2, round(ss / 22)))[..., None]
        ink = np.array((25, 25, 30) if subject.outline == "dark" else (248, 248, 240), np.float32)
        img += (ink - img) * line
    # lighting: exposure, colour temperature, a soft light direction, sensor noise
    light = (rng.uniform(0.85, 1.12) * (1 + rng.uniform(-0.05, 0.05, 3))).astype(np.float32)
    direction = rng.uniform(-0.18, 0.18, 2).astype(np.float32)
    img *= light * (1 + direction[0] * xx + direction[1] * yy)[..., None]
    img += 3.0 * rng.standard_normal(img.shape, dtype=np.float32)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))


def photo_rng(subject: Subject, index: int, seed: int = 0) -> np.random.Generator:
    return _rng(99, _NAMESPACES[subject.namespace], subject.seed, seed, index)


def photos(
    subject: Subject, count: int, seed: int = 0, size: int = SIZE, start: int = 0, empty: bool = False
) -> list[Image.Image]:
    """``count`` photos of ``subject`` (photo i is the same whatever ``count`` is); ``empty``: without
    the subject (the same scenes)."""
    return [render(subject, photo_rng(subject, i, seed), size, empty) for i in range(start, start + count)]


# ------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------
def class_prompt(cls: str) -> str:
    """The DreamBooth class prompt: generic instances of the class."""
    return f"a photo of {cls}"


def instance_prompt(cls: str, identifier: str = IDENTIFIER) -> str:
    """The DreamBooth instance prompt: the personalized subject."""
    return f"a photo of {identifier} {cls}"


def caption(subject: Subject, rng: np.random.Generator) -> str:
    """A random pretraining caption of a photo: the class, and each describable attribute or not.

    About a third of the captions are the bare class prompt, so "a photo of <class>" means
    the whole class; the others name the colour and/or the pattern (never the outline or the
    fine details, and never the identifier).
    """
    r = rng.random()
    head = "a photo of" if rng.random() < 0.85 else str(rng.choice(["a picture of", "a photo of the"]))
    if r < 0.3:
        return f"{head} {subject.cls}"
    color = f"{subject.color} " if r < 0.8 else ""
    pattern = f" with {subject.pattern_color} {subject.pattern}" if r > 0.55 else ""
    return f"{head} {color}{subject.cls}{pattern}"


def grid(images: list[Image.Image], cols: int | None = None, scale: int = 2) -> Image.Image:
    """Images side by side (``cols`` per row), each enlarged ``scale`` times (nearest)."""
    if not images:
        raise ValueError("grid() needs at least one image")
    cols = cols or min(len(images), 8)
    w, h = images[0].size
    rows = -(-len(images) // cols)
    out = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return out.resize((cols * w * scale, rows * h * scale), Image.Resampling.NEAREST) if scale > 1 else out
