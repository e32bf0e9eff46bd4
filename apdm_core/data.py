"""Subject images: find, open, validate, orient, crop and resize. Input files are only read."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MIN_SIDE = 256  # px; relaxed to the model's resolution for models smaller than this


@dataclass
class SubjectImage:
    name: str  # file stem (or "image_003" for in-memory images); pairs are matched by it
    image: Image.Image  # RGB, square, at the training resolution
    path: str = ""


def find_images(source: str | Path | Sequence[str | Path], order: str = "name") -> list[Path]:
    """Image files from a folder or an explicit list. ``order``: 'name' (sorted) or 'listdir'."""
    items = [source] if isinstance(source, (str, Path)) else list(source)
    if not items or all(not str(i) for i in items):
        raise InputError("No subject images given: pass a folder or image files (png/jpg/webp).")
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            names = os.listdir(p)
            if order == "name":
                names = sorted(names)
            found = [p / n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
            if not found:
                raise InputError(
                    f"{p} contains no png/jpg/webp images; put the subject photos in this folder."
                )
            files.extend(found)
        elif p.is_file():
            if not p.name.lower().endswith(IMAGE_EXTENSIONS):
                raise InputError(f"{p} is not a png/jpg/webp image; convert it or remove it from the list.")
            files.append(p)
        else:
            raise InputError(f"{p} does not exist; check the path of the subject images.")
    return files


def center_square(image: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square and resize to ``size`` (bicubic, antialiased)."""
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def prepare_image(
    image: Image.Image, size: int, name: str = "image", min_side: int | None = None, crop: bool = True
) -> Image.Image:
    """EXIF-orient, convert to RGB, check the short side, then center-crop and resize (unless ``crop=False``)."""
    image = to_rgb(ImageOps.exif_transpose(image))
    limit = min(MIN_SIDE, size) if min_side is None else min_side
    if min(image.size) < limit:
        raise InputError(
            f"{name} is too small ({image.size[0]}x{image.size[1]} px); the short side must be at least "
            f"{limit} px. Use a larger photo of the subject."
        )
    return center_square(image, size) if crop else image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit and float grayscale are scaled (PIL's convert would clip
    them to white), CMYK, palette, gray and alpha images converted."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if arr.max() <= 1 else 255.0
        else:
            top = 65535.0 if arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def open_image(path: Path) -> Image.Image:
    """The first frame of an image file (an animated GIF/WebP gives its first frame), fully decoded.

    Pillow refuses images of more than 2 x ``Image.MAX_IMAGE_PIXELS`` (about 179 megapixels) as a
    possible decompression bomb; that, like any unreadable file, is an InputError naming the file.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy() if im.mode != "P" else im.convert("RGBA")
    except Image.DecompressionBombError as exc:
        raise InputError(
            f"{path} is too large to open safely ({exc}); downscale it (e.g. to 2048 px on the long side)."
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InputError(
            f"{path} cannot be read as an image ({exc.__class__.__name__}); re-save it as PNG or JPEG, or remove it."
        ) from exc


def load_subject_images(
    source, size: int, order: str = "name", min_side: int | None = None, crop: bool = True
) -> list[SubjectImage]:
    """Load subject photos from a folder / list of files, or wrap PIL images given directly.

    ``crop=False`` keeps each photo's own shape (oriented, RGB, size-checked) for augmentation.
    """
    if isinstance(source, Image.Image) or (
        isinstance(source, (list, tuple)) and source and isinstance(source[0], Image.Image)
    ):
        images = [source] if isinstance(source, Image.Image) else list(source)
        subjects = [
            SubjectImage(f"image_{i:03d}", prepare_image(im, size, f"image {i}", min_side, crop))
            for i, im in enumerate(images)
        ]
    else:
        subjects = []
        for path in find_images(source, order):
            subjects.append(
                SubjectImage(
                    path.stem, prepare_image(open_image(path), size, str(path), min_side, crop), str(path)
                )
            )
    if not subjects:
        raise InputError("No subject images given: at least 1 image is needed (4-6 is typical).")
    names = [s.name for s in subjects]
    if len(set(names)) != len(names):
        raise InputError(
            f"Subject images must have distinct file names (pairs are matched by name): {names}."
        )
    if len(subjects) < 3:
        warnings.warn(
            f"Only {len(subjects)} subject image(s): protection generalises better with 4-6 photos of the subject.",
            UserWarning,
            stacklevel=2,
        )
    return subjects


def resize_short_side(image: Image.Image, short: int) -> Image.Image:
    """Resize so the short side is ``short`` px, keeping the aspect ratio (bicubic, antialiased)."""
    w, h = image.size
    if (w <= h and w == short) or (h <= w and h == short):
        return image
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    return image.resize((nw, nh), Image.Resampling.BICUBIC)


def view_is_fixed(image: Image.Image, size: int, crop_scale: float = 1.0) -> bool:
    """True when a random crop of this image can only return one view (square at the crop size)."""
    w, h = resize_short_side(image, round(size * crop_scale)).size
    return w == size and h == size


def random_view(
    image: Image.Image,
    size: int,
    generator,
    *,
    crop: bool = True,
    crop_scale: float = 1.0,
    flip: bool = False,
) -> Image.Image:
    """One augmented training view, as DreamBooth trainers make them: resize the short side to
    ``size * crop_scale``, crop ``size`` x ``size`` (random position, or centered with ``crop=False``),
    and mirror with probability 1/2 when ``flip``. All randomness comes from the torch ``generator``.
    """
    import torch

    im = resize_short_side(image, round(size * crop_scale))
    w, h = im.size
    if crop:
        left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    else:
        left, top = int(round((w - size) / 2)), int(round((h - size) / 2))
    view = im.crop((left, top, left + size, top + size))
    if flip and float(torch.rand(1, generator=generator)) < 0.5:
        view = ImageOps.mirror(view)
    return view
