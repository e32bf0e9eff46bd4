"""EvalConfig: how attacked models are sampled and scored (validated, JSON/YAML round trip)."""

from __future__ import annotations

from dataclasses import dataclass

from ..configio import ConfigIO, _f
from ..errors import InputError

PROMPT_SETS = ("auto", "person", "live", "object")
DEFAULT_METRICS = ["denoise", "dino", "brisque", "face", "fdfr", "clip", "pyiqa"]


@dataclass
class EvalConfig(ConfigIO):
    prompts: list[str] = _f(
        [],
        "Sampling prompts with {id} (identifier) and {cls} (class noun), e.g. 'a photo of {id} {cls}'; "
        "empty = the prompt set.",
        group="sampling",
    )
    prompt_set: str = _f(
        "auto",
        "Prompt list when prompts is empty: 'person' (the paper: a photo of / a portrait of sks person), "
        "'live' or 'object' (the DreamBooth lists); 'auto' picks by the class noun.",
        PROMPT_SETS,
        group="sampling",
    )
    num_samples: int = _f(30, "Images generated per attacked model (the prompts in turn).", group="sampling")
    eval_seed: int = _f(
        0, "Seed of the first sample (sample i uses seed + i) and of the denoising noise.", group="sampling"
    )
    eval_steps: int = _f(50, "Denoising steps per sample.", group="sampling")
    eval_guidance: float = _f(7.5, "Classifier-free guidance of the samples.", group="sampling")
    eval_batch_size: int = _f(4, "Samples generated per batch.", group="sampling")
    eval_resolution: int = _f(0, "Sample size in pixels; 0 = the model's native size.", group="sampling")
    utility_prompts: list[str] = _f(
        ["a photo of {cls}", "a photo of a house"],
        "What the protection may cost, shown in the report before any attack: these prompts ({cls} = the class "
        "noun) on the unprotected and the protected model with the same seeds; empty = none.",
        group="sampling",
    )
    utility_samples: int = _f(
        8, "Samples per utility prompt and model (0 = no utility rows).", group="sampling"
    )
    metrics: list[str] = _f(
        list(DEFAULT_METRICS),
        "Metrics to compute (registered names); one whose library or weights are missing is skipped "
        "with a message saying what to install or download.",
        group="metrics",
    )
    dino_model: str = _f(
        "facebook/dino-vits16",
        "DINO ViT-S/16: a local folder or a hub id resolved from the local HF cache only.",
        group="metrics",
    )
    clip_model: str = _f(
        "openai/clip-vit-large-patch14",
        "CLIP for the text-image score: a local folder or a hub id resolved from the local HF cache only.",
        group="metrics",
    )
    pyiqa_metrics: list[str] = _f(
        ["musiq", "clipiqa"], "pyiqa metric names to compute when pyiqa is installed.", group="metrics"
    )
    denoise_timesteps: list[int] = _f(
        [100, 300, 500, 700, 900],
        "Timesteps of the denoising score (noise-prediction error on held-out subject images).",
        group="metrics",
    )
    denoise_repeats: int = _f(
        4, "Fixed noise draws per image and timestep (denoising score).", group="metrics"
    )

    def __post_init__(self) -> None:
        self.coerce_types()
        self.prompts = [str(p) for p in self.prompts]
        self.metrics = [str(m) for m in self.metrics]
        self.denoise_timesteps = [int(t) for t in self.denoise_timesteps]
        self.validate()

    def validate(self) -> EvalConfig:
        self.check_choices()
        self.check_ranges(
            at_least_one=("num_samples", "eval_steps", "eval_batch_size", "denoise_repeats"),
            non_negative_int=("eval_seed", "eval_resolution", "utility_samples"),
            non_negative=("eval_guidance",),
        )
        if self.eval_resolution % 8:
            raise InputError(f"EvalConfig.eval_resolution={self.eval_resolution} must be a multiple of 8.")
        bad = [t for t in self.denoise_timesteps if not 0 <= t < 1000]
        if bad or not self.denoise_timesteps:
            raise InputError(
                f"EvalConfig.denoise_timesteps must be training timesteps in [0, 1000) (got {self.denoise_timesteps})."
            )
        for p in self.prompts:
            if "{id}" not in p:
                raise InputError(f"Sampling prompt {p!r} has no {{id}}; e.g. 'a photo of {{id}} {{cls}}'.")
        return self
