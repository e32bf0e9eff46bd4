"""Image-level protection: perturb the photos themselves (for owners who do not control the model).

``protect_images(ImageProtectConfig(...))`` runs one of ``METHODS`` (``aspl``: Anti-DreamBooth's
pixel PGD against a surrogate DreamBooth; ``ldu``: Latent Diffusion Unlearning's trajectory-shifted
latent perturbation) and returns (and writes) protected PNGs within an L-infinity budget;
``purify`` holds the robustness transforms the comparison applies (JPEG, resize, blur, DiffPure).
A method is one module with an ``ImageMethod`` subclass and one line in ``config.METHODS``.
"""

from .config import IMAGE_METHODS, METHODS, ImageProtectConfig
from .run import ImageProtectResult, get_image_method, image_metrics, protect_images, write_images

__all__ = [
    "IMAGE_METHODS",
    "METHODS",
    "ImageProtectConfig",
    "ImageProtectResult",
    "get_image_method",
    "image_metrics",
    "protect_images",
    "write_images",
]
