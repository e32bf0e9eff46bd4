"""ProtectConfig: every setting of a protection run, validated, with a JSON/YAML round trip.

Defaults are the paper's (APDM, arXiv 2511.01307, Sec. 5.1): AdamW, lr_personalize =
lr_protect = 5e-6, 800 outer steps, N_per = 20 inner steps, beta = 1, prior weight 1,
batch 1, at the model's native resolution (512 px for SD1.5). One dataclass serves the CLI
(flags are generated from the fields), the ComfyUI nodes, the Gradio UI and the state file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .attacker_settings import ATTACKER_KINDS, AttackerSettings, layers_within
from .configio import ConfigIO, _f
from .errors import InputError
from .methods import METHODS, method_settings_classes
from .presets import PRESETS
from .subjects import SUBJECT_KEYS, Subject, check_subjects, identifier_word  # noqa: F401
from .untrusted import MODEL_TYPES, PATH_FIELDS, untrusted_settings  # noqa: F401

ACCUMULATIONS = ("protect", "protect+personalize")
PAIR_ORDERS = ("name", "listdir")
PRECISIONS = ("no", "bf16")
REF_PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
ADAMW_IMPLS = ("auto", "fused", "foreach", "loop")
ATTENTIONS = ("sdpa", "xformers")
DISTRIBUTED = ("auto", "no", "ddp", "fsdp")
# performance levers that cannot run with a setting of the run (when it is > 0): (lever, setting, why)
LEVER_CLASHES = (
    ("optimizer_in_backward", "inner_max_grad_norm", "needs the whole gradient before the step"),
    ("offload_outer", "anchor_weight", "trains theta on the compute device"),
)


@dataclass
class RunSettings(ConfigIO):
    """The settings of the run itself (the loop, the attacker, data, performance); each protection
    method adds its own (``apdm_core/methods/<name>/settings.py``, one registry line)."""

    # --- what to protect -------------------------------------------------------------
    model: str = _f(
        "", "Base model: a diffusers folder or a single-file .safetensors checkpoint.", group="io"
    )
    model_type: str = _f(
        "auto",
        "Single-file checkpoints: auto (detect from the tensors), sd1, sd2 (512, epsilon), "
        "sd2-v (768, v-prediction), sdxl, sdxl-v (SDXL v-prediction), or a diffusers config folder.",
        group="io",
    )
    reference_model: str = _f(
        "",
        "Adding a subject to a protected model: the original model it was protected from (same architecture). "
        "The anchor, the protection targets and the generated pairs/class/anchor images then come from it, "
        "not from the already-moved input model, so the drift of each round does not compound.",
        group="io",
    )
    images: list[str] = _f(
        [], "Subject images: a folder or a list of png/jpg/webp files (4-6 is typical).", group="io"
    )
    instance_prompt: str = _f(
        "a photo of sks person",
        "Prompt an attacker would personalize with (identifier + class).",
        group="basic",
    )
    class_prompt: str = _f(
        "a photo of person", "Generic class prompt: positives and prior-preservation images.", group="basic"
    )
    output: str = _f(
        "", "Where to write the protected model (a new folder or .safetensors file).", group="io"
    )
    subjects: list[dict] = _f(
        [],
        "More subjects protected in the same run, each a mapping with images (a folder or files), "
        "instance_prompt and class_prompt (and optionally class_images); the subjects take turns by attacker "
        "episode (resync_every outer steps each; outer_steps must give each one), and each subject's own episodes "
        "take attacker_family's kinds in turn. CLI: --subject FOLDER "
        "'INSTANCE PROMPT' 'CLASS PROMPT', repeated.",
        group="io",
    )
    interleave_subjects: bool = _f(
        False,
        "With subjects: take turns by outer step instead of by episode; each subject keeps its own persistent "
        "attacker (parked between its turns, theta's changes applied on its return), so every subject's "
        "protection is refreshed every few outer steps. Memory: one attacker state (theta' and its optimizer) "
        "per subject.",
        group="robust",
    )
    class_images: str = _f(
        "", "Optional folder of your own class images; missing ones are generated.", group="io"
    )
    cache_dir: str = _f(
        "", "Cache for generated pairs/class images (default: $APDM_CACHE_DIR or ~/.cache/apdm).", group="io"
    )
    state_path: str = _f("", "Resumable state file (default: <output>.apdm-state.pt).", group="io")
    # --- the algorithm ---------------------------------------------------------------
    method: str = _f(
        "apdm",
        "Protection method: 'apdm' (DPO + Learning to Protect, the paper) or 'persguard' (a backdoor that "
        "fires after the attacker's fine-tuning; README 'PersGuard'). Both train in the same simulated-"
        "attacker loop with the same levers.",
        tuple(METHODS),
        group="basic",
    )
    accumulation: str = _f(
        "protect",
        "L2P accumulation: 'protect' = paper Alg. 1 (protection gradients only); "
        "'protect+personalize' = the released code (also adds grad L_per at each inner step).",
        ACCUMULATIONS,
    )
    outer_steps: int = _f(800, "Outer protection steps N_protect.", group="basic")
    inner_steps: int = _f(
        20, "Simulated DreamBooth steps N_per per outer step (0 = DPO without L2P).", group="basic"
    )
    lr_protect: float = _f(5e-6, "Learning rate of the protection (outer) optimizer.", group="basic")
    lr_personalize: float = _f(5e-6, "Learning rate of the simulated attacker (inner) optimizer.")
    prior_weight: float = _f(1.0, "Weight lambda of the prior-preservation terms (both paths).")
    pair_order: str = _f(
        "name",
        "Pair subject and positive images by sorted name (paper) or directory order (released code).",
        PAIR_ORDERS,
    )
    num_class_images: int = _f(200, "Class images for prior preservation (DreamBooth uses 200).")
    resolution: int = _f(0, "Training resolution in pixels; 0 = the model's native size (512 for SD1.5).")
    batch_size: int = _f(1, "Images per step for each term.")
    optimizer: str = _f(
        "adamw",
        "Optimizer for both paths; 'adamw8bit' keeps the AdamW moments in 8 bits (bitsandbytes, CUDA only): "
        "less memory, approximates AdamW. An outer optimizer moved to CPU by offload_outer stays 32-bit.",
        OPTIMIZERS,
    )
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    # --- generation of pairs / class images --------------------------------------------
    sample_steps: int = _f(50, "Denoising steps when generating positives and class images.")
    guidance_scale: float = _f(7.5, "Classifier-free guidance when generating positives and class images.")
    sample_batch_size: int = _f(4, "Images generated per batch.")
    # --- run control ---------------------------------------------------------------------
    seed: int = _f(
        0, "Seed for everything random (data order, timesteps, noise, generated images).", group="basic"
    )
    device: str = _f("auto", "'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")
    mixed_precision: str = _f(
        "no", "Autocast precision for the UNet passes ('bf16' recommended on recent GPUs).", PRECISIONS
    )
    save_every: int = _f(
        50, "Write the resumable state every K outer steps (0 = only when stopped or finished)."
    )
    # --- performance: how it is computed, not what (README "Performance") -----------------
    ref_precision: str = _f(
        "fp32",
        "Precision of the frozen reference UNet (forward only); 'bf16' halves its memory and matches "
        "mixed_precision='bf16' up to rounding.",
        REF_PRECISIONS,
        group="performance",
    )
    attention: str = _f(
        "sdpa",
        "Attention kernel: PyTorch SDPA (flash/memory-efficient on CUDA) or xformers (CUDA and xformers "
        "installed; otherwise SDPA with a warning).",
        ATTENTIONS,
        group="performance",
    )
    gradient_checkpointing: bool = _f(
        False,
        "Recompute UNet activations in the backward: much less memory, one more forward per backward.",
        group="performance",
    )
    channels_last: bool = _f(
        False,
        "Keep UNet weights and activations in channels_last memory format (faster convs on GPUs).",
        group="performance",
    )
    adamw_impl: str = _f(
        "auto",
        "AdamW kernel: 'fused' (one kernel, CUDA/CPU), 'foreach' (multi-tensor), 'loop' (per tensor); "
        "auto = fused on CUDA, foreach elsewhere.",
        ADAMW_IMPLS,
        group="performance",
    )
    optimizer_in_backward: bool = _f(
        False,
        "Apply the simulated attacker's AdamW step per parameter during the backward, so its gradients "
        "never exist all at once (saves one UNet-sized buffer).",
        group="performance",
    )
    offload_outer: bool = _f(
        False,
        "Keep theta and the outer AdamW states in CPU memory (used once per outer step): saves three "
        "UNet-sized buffers on the GPU, costs a copy each way and a CPU AdamW step per outer step.",
        group="performance",
    )
    compile_unet: bool = _f(
        False,
        "torch.compile the UNet passes (pays off on long GPU runs; the first steps compile).",
        group="performance",
    )
    distributed: str = _f(
        "auto",
        "Under `accelerate launch` with several processes: 'ddp' splits the batch of pair/prior terms "
        "over the processes (batch_size must divide evenly), 'fsdp' also shards theta' and the reference "
        "UNet (theta stays whole in CPU memory); "
        "auto = ddp when launched with >1 process.",
        DISTRIBUTED,
        group="performance",
    )


@dataclass
class ProtectConfig(*method_settings_classes(), AttackerSettings, RunSettings):
    """Every setting of a protection run: ``RunSettings``, the simulated attacker's (``AttackerSettings``,
    attacker_settings.py) and each registered method's own settings
    (``methods/<name>/settings.py``), as flat keys: one field, flag, widget and YAML key each. Only the
    active method's settings enter the run identity."""

    def __post_init__(self) -> None:
        self.coerce_types()
        self.normalize_images()
        # "sks,zwx" (one CLI word or a text box) is two identifiers
        self.extra_identifiers = [
            w.strip() for item in self.extra_identifiers for w in item.split(",") if w.strip()
        ]
        self.validate()

    # ------------------------------------------------------------------------------------
    def validate(self) -> ProtectConfig:
        """Raise InputError naming the field and the fix when a value is out of range."""
        self.check_choices()
        self.check_bools()
        self.check_ranges(
            at_least_one=(
                "outer_steps",
                "batch_size",
                "sample_steps",
                "sample_batch_size",
                "resync_every",
                "protect_every",
                "num_anchor_images",
            ),
            non_negative_int=(
                "inner_steps",
                "num_class_images",
                "resolution",
                "save_every",
                "seed",
                "inner_batch_size",
                "tail_average",
            ),
            positive=("lr_protect", "lr_personalize", "adam_epsilon", "lora_lr"),
            non_negative=(
                "prior_weight",
                "adam_weight_decay",
                "guidance_scale",
                "late_weighting",
                "conflict_weight",
                "trap_weight",
                "inner_max_grad_norm",
                "lr_personalize_max",
                "lora_lr_max",
                "anchor_weight",
                "sam_radius",
            ),
            unit_interval=("adam_beta1", "adam_beta2", "null_space", "protect_beta1"),
        )
        if self.model_type not in MODEL_TYPES and not Path(self.model_type).is_dir():
            raise InputError(
                f"ProtectConfig.model_type={self.model_type!r} is not valid; choose one of {', '.join(MODEL_TYPES)} "
                "or pass a diffusers config folder."
            )
        if self.inner_steps and self.protect_every > self.inner_steps:
            raise InputError(
                f"ProtectConfig.protect_every={self.protect_every} must be <= inner_steps={self.inner_steps} "
                "(every outer step takes at least one protection gradient)."
            )
        self.check_resolution_and_prompts()
        self.check_subjects()
        self.check_lever_combinations()
        for settings in method_settings_classes():  # each method checks its own settings
            settings.check(self)
        from .methods import get_method

        if self.offload_outer and get_method(self.method).uses_theta_loss(self):
            raise InputError(
                f"method={self.method!r} trains a term at theta on the compute device (behaviour_weight > 0): "
                "turn offload_outer off."
            )
        return self

    def all_subjects(self, images=None, subject_images=None) -> list[Subject]:
        """The primary subject (``images``, the instance and class prompts) and each of ``subjects``;
        ``images`` / ``subject_images`` replace their photos with preloaded ones (a host's)."""
        primary = Subject(tuple(self.images if images is None else images), self.instance_prompt, self.class_prompt,
                          self.class_images)  # fmt: skip
        extra = []
        for i, s in enumerate(self.subjects):
            photos = s.get("images", ())
            if subject_images is not None and i < len(subject_images) and subject_images[i] is not None:
                photos = subject_images[i]
            photos = [photos] if isinstance(photos, (str, Path)) else list(photos)
            extra.append(Subject(tuple(photos), s.get("instance_prompt", ""), s.get("class_prompt", ""),
                                 s.get("class_images", "")))  # fmt: skip
        return [primary, *extra]

    def for_subject(self, subject: Subject) -> ProtectConfig:
        """This run's settings with ``subject``'s prompts and photos in the primary place (one subject)."""
        images = [str(p) for p in subject.images if isinstance(p, (str, Path))]
        return self.replace(images=images, instance_prompt=subject.instance_prompt, class_prompt=subject.class_prompt,
                            class_images=subject.class_images, subjects=[])  # fmt: skip

    def check_subjects(self) -> None:
        """Every subject has photos and both prompts; no two subjects share an identifier; every subject
        gets an attacker episode (the subjects take turns, one episode of resync_every outer steps each)."""
        check_subjects(self.subjects, self.all_subjects)
        n, r = 1 + len(self.subjects), self.resync_every
        if self.interleave_subjects and self.outer_steps < n:
            raise InputError(f"{n} subjects take turns by outer step (interleave_subjects) but outer_steps="
                             f"{self.outer_steps} < {n}: set outer_steps to at least {n}.")  # fmt: skip
        episodes = -(-self.outer_steps // r)  # a partial last episode counts
        if episodes < n and not self.interleave_subjects:
            raise InputError(
                f"{n} subjects take turns, one attacker episode of resync_every={r} outer steps each, but "
                f"outer_steps={self.outer_steps} gives {episodes} episode(s): subjects after the first "
                f"{episodes} would not be protected. Set outer_steps to at least {n * r} (an episode each) "
                "or lower resync_every."
            )

    def check_lever_combinations(self) -> None:
        """Combinations of levers that cannot run together (found here, before pairs are made)."""
        unknown = [k for k in self.attacker_family if k not in ATTACKER_KINDS]
        if unknown or not self.attacker_family:
            raise InputError(
                f"ProtectConfig.attacker_family={self.attacker_family!r}: give one or more of {', '.join(ATTACKER_KINDS)}."
            )
        if any(r < 1 for r in self.lora_ranks) or not self.lora_ranks:
            raise InputError(f"ProtectConfig.lora_ranks={self.lora_ranks!r} must be whole numbers >= 1.")
        if any(b < 1 for b in self.inner_batch_sizes):
            raise InputError(
                f"ProtectConfig.inner_batch_sizes={self.inner_batch_sizes!r} must be whole numbers >= 1 "
                "(or empty: every episode uses inner_batch_size)."
            )
        if self.tail_average > self.outer_steps:
            raise InputError(
                f"ProtectConfig.tail_average={self.tail_average} averages more outer steps than the run has "
                f"(outer_steps={self.outer_steps}): set it to at most {self.outer_steps}, or 0 (off)."
            )
        if self.hypergradient and (self.optimizer_in_backward or self.optimizer != "adamw" or self.attention != "sdpa"
                                   or self.accumulation != "protect" or not self.inner_steps):  # fmt: skip
            raise InputError(
                "ProtectConfig.hypergradient unrolls the simulated attacker's AdamW steps with PyTorch attention: it "
                "needs inner_steps >= 1, accumulation='protect', optimizer='adamw', attention='sdpa' and "
                "optimizer_in_backward off."
            )
        if self.sam_radius > 0 and self.sam_weights == "others" and self.protect_layers == "all":
            raise InputError(
                "ProtectConfig.sam_weights='others' moves the weights outside protect_layers, and protect_layers='all' "
                "leaves none: choose protect_layers (e.g. cross_attention) or sam_weights='all'."
            )
        if self.trap_weight > 0 and not self.anchor_weight > 0:
            raise InputError(
                f"ProtectConfig.trap_weight={self.trap_weight} pulls the attacked model off the anchor's images, which "
                "exist only with anchor_weight > 0: set anchor_weight (e.g. 3) or trap_weight 0."
            )
        for lever, setting, why in LEVER_CLASHES:
            if getattr(self, lever) and getattr(self, setting) > 0:
                raise InputError(f"{setting} > 0 {why}; turn {lever} off.")
        if not layers_within(self.protect_layers, self.attacker_layers):
            raise InputError(
                f"ProtectConfig.protect_layers={self.protect_layers!r} changes layers the simulated attacker does not "
                f"train (attacker_layers={self.attacker_layers!r}); the protection gradient only reaches trained "
                "layers. Narrow protect_layers or widen attacker_layers."
            )

    # --- presets -----------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ProtectConfig:
        """A config from a named preset (see PRESETS), with explicit overrides on top."""
        if name not in PRESETS:
            raise InputError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


# Fields that change what is computed; a resumed run must agree on all of them.
RUN_IDENTITY_EXCLUDE = {"outer_steps", "save_every", "device", "output", "state_path", "cache_dir"}
# Performance levers that change how, not what, is computed (only rounding): a run may be resumed
# with other values (another GPU, more or fewer processes).
PERFORMANCE_ONLY = {
    "attention",
    "gradient_checkpointing",
    "channels_last",
    "adamw_impl",
    "optimizer_in_backward",
    "offload_outer",
    "compile_unet",
    "distributed",
}
RUN_IDENTITY_EXCLUDE |= PERFORMANCE_ONLY
