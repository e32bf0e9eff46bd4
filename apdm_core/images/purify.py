"""What happens to photos on their way to an attacker, and what an attacker does to clean them: the
transforms the robustness comparison applies (README "Image-level protection")."""

from __future__ import annotations

import io

from PIL import Image, ImageFilter


def jpeg(images: list[Image.Image], quality: int = 75) -> list[Image.Image]:
    """Each image saved as JPEG at ``quality`` and read back."""
    out = []
    for im in images:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out.append(Image.open(buf).convert("RGB"))
    return out


def resize(images: list[Image.Image], factor: float = 0.5) -> list[Image.Image]:
    """Each image downscaled by ``factor`` and scaled back to its size (bicubic both ways)."""
    out = []
    for im in images:
        w, h = im.size
        small = im.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BICUBIC)
        out.append(small.resize((w, h), Image.Resampling.BICUBIC))
    return out


def blur(images: list[Image.Image], radius: float = 1.0) -> list[Image.Image]:
    """Gaussian blur of ``radius`` pixels."""
    return [im.filter(ImageFilter.GaussianBlur(radius)) for im in images]


def diffpure(
    model,
    images: list[Image.Image],
    strength: float = 0.2,
    prompt: str = "",
    seed: int = 0,
    steps: int = 25,
    guidance: float = 1.0,
) -> list[Image.Image]:
    """DiffPure-style purification with the base model: noise each image to ``strength`` of the
    diffusion (img2img) and denoise it back (``prompt``, no guidance by default)."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**model.pipeline().components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(images))]
    with torch.no_grad():
        result = pipe(
            prompt=[prompt] * len(images),
            image=images,
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="pil",
        )
    return [im.resize(src.size) for im, src in zip(result.images, images)]


TRANSFORMS = {  # name -> (what, function of (model, images, seed))
    "jpeg75": ("JPEG quality 75", lambda model, images, seed: jpeg(images, 75)),
    "resize05": ("resized x0.5 and back", lambda model, images, seed: resize(images, 0.5)),
    "blur": ("Gaussian blur, radius 1 px", lambda model, images, seed: blur(images, 1.0)),
    "diffpure": (
        "DiffPure: noised to 0.2 and denoised by the base model",
        lambda model, images, seed: diffpure(model, images, 0.2, seed=seed),
    ),
}
