"""What the loop samples from: the subject, its positives, class images, the anchor, the prompts.

Fixed images are encoded once (their VAE latent distributions are cached and re-sampled every
draw) and the prompts are embedded once; the text encoder and VAE stay frozen.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from ..config import ProtectConfig
from ..errors import InputError
from ..methods import get_method
from ..models import SDModel
from ..pairs import generate_anchor_images, generate_fixed_images
from ..progress import ProgressCallback, StopCheck, Tracker
from ..training import Diffusion, LatentBank


@dataclass
class ProtectionData:
    """Everything the loop samples from: latent banks and the two prompt embeddings."""

    subject: LatentBank  # x- (the subject; DPO negatives, DreamBooth instance images)
    positive: LatentBank  # x+ paired with subject[i] (same index)
    prior: LatentBank | None  # class images for prior preservation
    instance_embeds: torch.Tensor  # (1, L, D)
    class_embeds: torch.Tensor  # (1, L, D)
    diffusion: Diffusion  # forward diffusion with the model's training scheduler
    anchor: AnchorSet | None = None  # images the utility anchor keeps (anchor_weight > 0)
    # the instance prompt with each of extra_identifiers in place of its identifier: (K, L, D)
    identifier_embeds: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)  # what the protection method prepared (methods/*.prepare)


@dataclass
class AnchorSet:
    """Images of the anchor prompts (one latent bank per prompt) with their prompt embeddings.

    Bank 0 is the class prompt: the prompt the protection is most likely to disturb (it shares all
    but the identifier with the instance prompt), so it takes half of every anchor batch; the other
    half is one image of each of the other prompts (a random subset when there are more).
    """

    banks: list[LatentBank]
    embeds: torch.Tensor  # (prompts, L, D)

    def draw(self, count: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` latents (half of the class prompt, the rest one per other prompt) and their embeddings."""
        others = len(self.banks) - 1
        n_other = min(others, count // 2)
        pick = (torch.randperm(others, generator=g)[:n_other] + 1).tolist() if n_other else []
        which = [0] * (count - n_other) + pick
        latents = torch.cat(
            [self.banks[0].draw(count - n_other, g)] + [self.banks[i].draw(1, g) for i in pick]
        )
        return latents, self.embeds[torch.tensor(which, device=self.embeds.device)]


def prepare_data(
    config: ProtectConfig,
    model: SDModel,
    subjects,
    size: int,
    progress: ProgressCallback | None,
    should_stop: StopCheck | None,
    anchor: bool = True,
) -> ProtectionData:
    """Generate/load positives and class images, then encode every fixed image and prompt once."""
    positives, class_images = fixed_images(config, model, subjects, size, progress, should_stop)
    data = encode_data(config, model, subjects, positives, class_images, progress, should_stop)
    data.extra = get_method(config.method).prepare(
        config, model, subjects, positives, size, progress, should_stop
    )
    if anchor:
        data.anchor = anchor_set(config, model, size, progress, should_stop)
    return data


def anchor_set(config: ProtectConfig, model: SDModel, size: int, progress, should_stop) -> AnchorSet | None:
    """The anchor's images (class prompt first, then anchor_prompts, and the empty prompt with
    anchor_unconditional), encoded; None without an anchor."""
    anchors = generate_anchor_images(config, model, size, progress, should_stop)
    if not anchors:
        return None
    return AnchorSet(
        [LatentBank(*model.encode_images(images)) for _, images in anchors],
        model.encode_prompts([prompt for prompt, _ in anchors], size=size),
    )


def prepare_subjects(
    config: ProtectConfig, model: SDModel, subject_sets: list, size: int, progress=None, should_stop=None
) -> list[ProtectionData]:
    """One ProtectionData per subject of ``config.all_subjects()`` (``subject_sets[i]``: its loaded photos):
    its pairs, class images, prompts and the method's data; one anchor shared by all, which keeps every
    subject's class prompt (the primary's first, the others' among its prompts)."""
    specs = config.all_subjects()
    if len(specs) == 1:
        return [prepare_data(config, model, subject_sets[0], size, progress, should_stop)]
    datas = [prepare_data(config.for_subject(spec), model, subjects, size, progress, should_stop, anchor=False)
             for spec, subjects in zip(specs, subject_sets)]  # fmt: skip
    classes = [s.class_prompt for s in specs[1:]]
    shared = anchor_set(config.replace(anchor_prompts=[*config.anchor_prompts, *classes], subjects=[]), model, size,
                        progress, should_stop)  # fmt: skip
    for d in datas:
        d.anchor = shared
    return datas


def fixed_images(
    config: ProtectConfig,
    model: SDModel,
    subjects,
    size: int,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> tuple[list, list]:
    """The positives x+ (``positives[i]`` pairs with ``subjects[i]``) and the prior class images."""
    positives, class_images = generate_fixed_images(config, model, subjects, size, progress, should_stop)
    if config.pair_order == "listdir":  # the released code pairs two unsorted directory listings:
        # emulate that arbitrary (but here reproducible) pairing with a name-keyed permutation
        order = sorted(
            range(len(positives)), key=lambda i: zlib.crc32(f"{config.seed}:{subjects[i].name}".encode())
        )
        positives = [positives[i] for i in order]
    return positives, class_images


def encode_data(
    config: ProtectConfig,
    model: SDModel,
    subjects,
    positives: list,
    class_images: list,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> ProtectionData:
    """VAE latent distributions of the fixed images and the two prompt embeddings, computed once."""
    tracker = Tracker("encode", 3, progress, should_stop)
    subject = LatentBank(*model.encode_images([s.image for s in subjects]))
    positive = LatentBank(*model.encode_images(positives))
    tracker.update(message="images")
    prior = LatentBank(*model.encode_images(class_images)) if class_images else None
    tracker.update(message="class images")
    variants = identifier_prompts(config)
    embeds = model.encode_prompts(
        [config.instance_prompt, config.class_prompt, *variants], size=config.resolution or None
    )
    tracker.update(message="prompts")
    return ProtectionData(
        subject,
        positive,
        prior,
        embeds[:1],
        embeds[1:2],
        Diffusion(model.noise_scheduler()),
        identifier_embeds=embeds[2:] if variants else None,
    )


def identifier_prompts(config: ProtectConfig) -> list[str]:
    """The instance prompt with each of ``extra_identifiers`` in place of its identifier (the word
    of the instance prompt that the class prompt lacks)."""
    if not config.extra_identifiers:
        return []
    class_words = set(config.class_prompt.split())
    words = config.instance_prompt.split()
    own = [i for i, w in enumerate(words) if w not in class_words]
    if len(own) != 1:
        raise InputError(
            f"extra_identifiers needs an instance prompt with exactly one word the class prompt lacks "
            f"(e.g. 'a photo of sks dog' / 'a photo of dog'); {config.instance_prompt!r} has {len(own)}."
        )
    return [" ".join(words[: own[0]] + [w] + words[own[0] + 1 :]) for w in config.extra_identifiers]
