"""ProtectConfig: every setting of a protection run, validated, with a JSON/YAML round trip.

Defaults are the paper's (APDM, arXiv 2511.01307, Sec. 5.1): AdamW, lr_personalize =
lr_protect = 5e-6, 800 outer steps, N_per = 20 inner steps, beta = 1, prior weight 1,
batch 1, at the model's native resolution (512 px for SD1.5). One dataclass serves the CLI
(flags are generated from the fields), the ComfyUI nodes, the Gradio UI and the state file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import InputError
from .methods import METHODS

LOSSES = ("dpo", "naive", "target")
BACKDOORS = ("pattern", "erasure", "target")  # PersGuard's backdoor kinds (methods/persguard.py)
BACKDOOR_INPUTS = ("backdoor", "subject")
ACCUMULATIONS = ("protect", "protect+personalize")
DPO_REDUCTIONS = ("sample", "element")
PAIR_ORDERS = ("name", "listdir")
PRECISIONS = ("no", "bf16")
REF_PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
ADAMW_IMPLS = ("auto", "fused", "foreach", "loop")
ATTENTIONS = ("sdpa", "xformers")
DISTRIBUTED = ("auto", "no", "ddp", "fsdp")
MODEL_TYPES = ("auto", "sd1", "sd2", "sd2-v")
PROTECT_LAYERS = ("all", "attention", "cross_attention")
# Settings that name files or folders (of every config class). They come only from a host's own
# widgets (a model dropdown, a folder of ComfyUI/input, the app's output folder), never from
# free-text settings a shared workflow or a web page can carry; see ``untrusted_settings``.
PATH_FIELDS = frozenset(
    {
        "model",
        "images",
        "output",
        "class_images",
        "cache_dir",
        "state_path",
        "dino_model",
        "clip_model",
        "backdoor_images",
    }  # fmt: skip
)


def untrusted_settings(data: dict[str, Any], where: str = "these settings") -> dict[str, Any]:
    """``data`` (settings typed into a host's free-text box) when it names no file or folder.

    A ComfyUI workflow JSON shared by someone else, or a page served to a network, must not be
    able to make the tool read or write arbitrary paths: path fields are refused, and
    ``model_type`` may only be one of MODEL_TYPES (a config folder is a path).
    """
    bad = sorted(k for k in data if k in PATH_FIELDS)
    if bad:
        raise InputError(
            f"{', '.join(bad)} cannot be set in {where}: files and folders come only from the host's own "
            "inputs (model and image loaders, the output folder); the cache and state files live in the "
            "host's folders."
        )
    if "model_type" in data and data["model_type"] not in MODEL_TYPES:
        raise InputError(
            f"model_type={data['model_type']!r} in {where} must be one of {', '.join(MODEL_TYPES)} "
            "(a config folder can only be given on the command line or in Python)."
        )
    return data  # see apdm_core.checkpoint


def _f(default: Any, help: str, choices: tuple | None = None, group: str = "advanced", **kw) -> Any:
    meta = {"help": help, "choices": choices, "group": group}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


_TYPE_WORDS = {int: "a whole number", float: "a number", str: "text"}


def _coerce(value: Any, typ: type) -> Any:
    """``value`` as ``typ`` (int, float, str, Path-like); TypeError/ValueError when it is not one."""
    if isinstance(value, bool) and typ is not bool:
        raise TypeError(value)
    if typ is int:
        if isinstance(value, str):
            value = float(value.strip()) if value.strip().lower() not in ("inf", "nan") else None
        if isinstance(value, float):
            if value is None or not value.is_integer():
                raise ValueError(value)
            return int(value)
        if not isinstance(value, int):
            raise TypeError(value)
        return value
    if typ is float:
        if isinstance(value, str):
            return float(value.strip())
        if not isinstance(value, (int, float)):
            raise TypeError(value)
        return float(value)
    if typ is str:
        if isinstance(value, (int, float, Path)):
            return str(value)
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    return value


def _example(f) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return repr(default) if not isinstance(default, str) else (default or "...")


class ConfigIO:
    """Shared by the config dataclasses: types, choices check, dict/JSON/YAML round trip, save/load."""

    def coerce_types(self) -> None:
        """Bring every field to its declared type or raise InputError naming the field and the value.

        A YAML file reads ``5e-6`` as a string and a hand-written config may hold ``2.5`` for a
        step count: numbers in strings become numbers, integral floats become ints, anything
        else that does not fit (``outer_steps: 2.5``, ``seed: 1.7``, ``lr: fast``) is refused.
        """
        import typing

        hints = typing.get_type_hints(type(self))
        name = type(self).__name__
        for f in fields(self):
            value, typ = getattr(self, f.name), hints[f.name]
            args = typing.get_args(typ)
            if value is None and type(None) in args:
                continue
            base = (
                next((a for a in args if a is not type(None)), typ)
                if args and typing.get_origin(typ) is not list
                else typ
            )
            try:
                if typing.get_origin(base) is list:
                    item = typing.get_args(base)[0]
                    if isinstance(value, (str, Path)):
                        value = [value]
                    if not isinstance(value, (list, tuple)):
                        raise TypeError
                    value = [_coerce(v, item) for v in value]
                elif base in (int, float, str):
                    value = _coerce(value, base)
            except (TypeError, ValueError):
                raise InputError(
                    f"{name}.{f.name}={value!r} is not {_TYPE_WORDS.get(base, str(base))}; "
                    f"e.g. {f.name}: {_example(f)}."
                ) from None
            setattr(self, f.name, value)

    def normalize_images(self) -> None:
        """``images`` as a list of path strings (one path, or none for an empty one, becomes a list)."""
        if isinstance(self.images, (str, Path)):
            self.images = [str(self.images)] if str(self.images) else []
        self.images = [str(p) for p in self.images]

    def check_choices(self) -> None:
        """Raise InputError for a field whose value is not one of its ``choices`` metadata."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise InputError(
                    f"{type(self).__name__}.{f.name}={value!r} is not valid; choose one of {', '.join(choices)}."
                )

    def check_bools(self) -> None:
        """Raise InputError for a bool field holding anything but True/False (e.g. "no" from a file)."""
        for f in fields(self):
            if f.type in (bool, "bool") and not isinstance(getattr(self, f.name), bool):
                raise InputError(
                    f"{type(self).__name__}.{f.name} must be true or false (got {getattr(self, f.name)!r})."
                )

    def check_ranges(
        self,
        at_least_one: tuple = (),
        non_negative_int: tuple = (),
        positive: tuple = (),
        non_negative: tuple = (),
        unit_interval: tuple = (),
    ) -> None:
        """Raise InputError for the first named field out of its range (None values are not checked)."""
        checks = (
            (at_least_one, lambda v: int(v) >= 1, "must be >= 1"),
            (non_negative_int, lambda v: int(v) >= 0, "must be >= 0"),
            (positive, lambda v: float(v) > 0 and math.isfinite(float(v)), "must be a positive number"),
            (non_negative, lambda v: float(v) >= 0 and math.isfinite(float(v)), "must be >= 0"),
            (unit_interval, lambda v: 0 <= float(v) < 1, "must be in [0, 1)"),
        )
        for names, ok, rule in checks:
            for name in names:
                value = getattr(self, name)
                if value is not None and not ok(value):
                    raise InputError(f"{type(self).__name__}.{name} {rule} (got {value}).")

    def check_resolution_and_prompts(self) -> None:
        """For configs with ``resolution``, ``instance_prompt`` and ``class_prompt`` fields."""
        if self.resolution and self.resolution % 8:
            raise InputError(
                f"{type(self).__name__}.resolution={self.resolution} must be a multiple of 8 (the VAE downsamples by 8)."
            )
        if not self.instance_prompt.strip() or not self.class_prompt.strip():
            raise InputError(
                "instance_prompt and class_prompt must not be empty (e.g. 'a photo of sks person' / 'a photo of person')."
            )

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                f"Unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}."
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        from .fileio import atomic_write_text

        path = Path(path)
        text = self.to_yaml() if path.suffix.lower() in (".yaml", ".yml") else self.to_json()
        return atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"Cannot read config {path}: {exc.strerror}.") from exc
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
            raise InputError(
                f"{path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {exc}"
            ) from exc
        if not isinstance(data, dict):
            raise InputError(f"{path} must contain a mapping of {cls.__name__} fields.")
        return cls.from_dict(data)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


@dataclass
class ProtectConfig(ConfigIO):
    # --- what to protect -------------------------------------------------------------
    model: str = _f(
        "", "Base model: a diffusers folder or a single-file .safetensors checkpoint.", group="io"
    )
    model_type: str = _f(
        "auto",
        "Single-file checkpoints: auto (detect from the tensors), sd1, sd2 (512, epsilon), "
        "sd2-v (768, v-prediction), or a diffusers config folder.",
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
    backdoor: str = _f(
        "target",
        "PersGuard's backdoor output for the trigger (the instance prompt) after personalization: 'pattern' "
        "(a class image with a checkerboard stamped on it), 'erasure' (images of erasure_prompt: no subject) "
        "or 'target' (images of target_prompt). method='persguard' only.",
        BACKDOORS,
        group="method",
    )
    target_prompt: str = _f(
        "", "PersGuard target backdoor: what the trigger produces instead of the subject (e.g. 'a photo of cat').",
        group="method",
    )  # fmt: skip
    erasure_prompt: str = _f(
        "a photo of an empty background",
        "PersGuard erasure backdoor: a scene without the subject; its images come from the base model.",
        group="method",
    )
    backdoor_input: str = _f(
        "backdoor",
        "PersGuard: what the backdoor terms noise. 'backdoor': the backdoor images (a plain denoising loss "
        "of the trigger on them); 'subject': the protected photos, with the target that denoises them to a "
        "backdoor image (tied to the photos the attacker trains on; in the demo world it delayed the "
        "attacker more but cost other classes' quality, README 'PersGuard').",
        BACKDOOR_INPUTS,
        group="method",
    )
    behaviour_weight: float = _f(
        1.0,
        "PersGuard: weight of the backdoor behaviour term at theta (the trigger generates the backdoor "
        "output before any attack), relative to one retention term at the attacked weights.",
        group="method",
    )
    backdoor_images: str = _f(
        "", "PersGuard erasure/target: a folder of your own backdoor output images (e.g. your photos with the "
        "subject painted out) instead of generated ones.", group="io",
    )  # fmt: skip
    num_backdoor_images: int = _f(8, "PersGuard erasure/target: backdoor images generated with the base model.",
                                  group="method")  # fmt: skip
    loss: str = _f(
        "dpo",
        "APDM's protection loss at the attacked weights: 'dpo' (the paper), 'naive' (-L_per + lambda*L_ppl, "
        "ablation) or 'target' (pull the instance-prompt prediction on subject images toward the frozen "
        "model's class-prompt prediction: the attacker learns a generic member of the class).",
        LOSSES,
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
    beta: float = _f(
        1.0,
        "DPO beta (1 = strongest protection; 10 or more preserves quality but protects less).",
        group="basic",
    )
    prior_weight: float = _f(1.0, "Weight lambda of the prior-preservation terms (both paths).")
    naive_lambda: float = _f(
        1.0, "lambda in the naive loss L_adv = -L_per + lambda*L_ppl (loss='naive' only)."
    )
    dpo_reduction: str = _f(
        "sample",
        "Apply log-sigmoid per sample (paper) or per latent element (released code).",
        DPO_REDUCTIONS,
    )
    pair_order: str = _f(
        "name",
        "Pair subject and positive images by sorted name (paper) or directory order (released code).",
        PAIR_ORDERS,
    )
    # --- the simulated attacker and what anchors utility (README "Protection that holds") ---
    resync_every: int = _f(
        1,
        "Refill the simulated attacker theta' from theta (fresh attacker optimizer) every this many outer "
        "steps; 1 = the paper (every outer step). R > 1 = a persistent attacker: theta' continues across R "
        "outer steps (each outer update is applied to theta' too), so the protection sees R x inner_steps "
        "attack steps for the cost of inner_steps.",
        group="robust",
    )
    protect_every: int = _f(
        1, "Take the protection gradient at every k-th simulated attack step only (1 = every step, the paper).",
        group="robust",
    )  # fmt: skip
    late_weighting: float = _f(
        0.0,
        "Weight the protection gradient at attack step h of an attacker episode by exp(w * (h - H)), H the "
        "episode length (0 = equal weights, the paper; TAR uses 0.0625 per step).",
        group="robust",
    )
    inner_batch_size: int = _f(
        0, "Subject images per simulated attack step (0 = batch_size); the world's attacker uses 2.", group="robust"
    )  # fmt: skip
    inner_max_grad_norm: float = _f(
        0.0, "Clip the simulated attacker's gradient norm (0 = no clipping; DreamBooth clips at 1).", group="robust"
    )  # fmt: skip
    lr_personalize_max: float = _f(
        0.0,
        "When above lr_personalize, each attacker episode draws its learning rate log-uniformly from "
        "[lr_personalize, lr_personalize_max] (attackers whose lr is not known).",
        group="robust",
    )
    anchor_weight: float = _f(
        0.0,
        "Weight of the utility anchor on theta: noise-prediction distillation to the frozen original on "
        "images of anchor_prompts (relative to one protection term; 0 = off, the paper).",
        group="robust",
    )
    anchor_prompts: list[str] = _f(
        [], "Prompts the anchor keeps besides the class prompt, which always takes half of the anchor "
        "(their images are generated by the base model and cached).", group="robust",
    )  # fmt: skip
    num_anchor_images: int = _f(8, "Anchor images per anchor prompt.", group="robust")
    extra_identifiers: list[str] = _f(
        [],
        "Other identifier words for the simulated attacker: each attacker episode uses one of the instance "
        "prompt's identifier and these, drawn at random, so that an attacker with another identifier is "
        "covered too (PersGuard's gray-box training).",
        group="robust",
    )
    protect_layers: str = _f(
        "all",
        "UNet layers the protection changes: all (the paper), attention (self + cross), cross_attention "
        "(IMMA's choice); the simulated attacker always trains the whole UNet, as the real one does.",
        PROTECT_LAYERS,
        group="robust",
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
        False, "Keep UNet weights and activations in channels_last memory format (faster convs on GPUs).",
        group="performance",
    )  # fmt: skip
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
        False, "torch.compile the UNet passes (pays off on long GPU runs; the first steps compile).",
        group="performance",
    )  # fmt: skip
    distributed: str = _f(
        "auto",
        "Under `accelerate launch` with several processes: 'ddp' splits the batch of pair/prior terms "
        "over the processes (batch_size must divide evenly), 'fsdp' also shards theta' and the reference "
        "UNet (theta stays whole in CPU memory); "
        "auto = ddp when launched with >1 process.",
        DISTRIBUTED,
        group="performance",
    )

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
                "num_backdoor_images",
            ),
            non_negative_int=(
                "inner_steps",
                "num_class_images",
                "resolution",
                "save_every",
                "seed",
                "inner_batch_size",
            ),
            positive=("lr_protect", "lr_personalize", "beta", "adam_epsilon"),
            non_negative=(
                "prior_weight",
                "naive_lambda",
                "adam_weight_decay",
                "guidance_scale",
                "late_weighting",
                "inner_max_grad_norm",
                "lr_personalize_max",
                "anchor_weight",
                "behaviour_weight",
            ),
            unit_interval=("adam_beta1", "adam_beta2"),
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
        self.check_lever_combinations()
        from .methods import get_method

        method = get_method(self.method)
        method.check(self)
        if self.offload_outer and method.uses_theta_loss(self):
            raise InputError(
                f"method={self.method!r} trains a term at theta on the compute device (behaviour_weight > 0): "
                "turn offload_outer off."
            )
        return self

    def check_lever_combinations(self) -> None:
        """Combinations of levers that cannot run together (found here, before pairs are made)."""
        if self.optimizer_in_backward and self.inner_max_grad_norm > 0:
            raise InputError(
                "inner_max_grad_norm needs the whole gradient before the step; turn optimizer_in_backward off."
            )
        if self.anchor_weight > 0 and self.offload_outer:
            raise InputError("anchor_weight > 0 trains theta on the compute device; turn offload_outer off.")

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
    "attention", "gradient_checkpointing", "channels_last", "adamw_impl", "optimizer_in_backward",
    "offload_outer", "compile_unet", "distributed",
}  # fmt: skip
RUN_IDENTITY_EXCLUDE |= PERFORMANCE_ONLY

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's settings (the defaults).
    "paper": {},
    # What the released reference code (KU-VGI/APDM protect.py) computes: it never zeroes the
    # personalization gradient, applies log-sigmoid per latent element, pairs by directory order.
    "reference": {"accumulation": "protect+personalize", "dpo_reduction": "element", "pair_order": "listdir"},
    # Short runs for a first look in a UI; protection is weaker than the paper's.
    "quick": {"outer_steps": 100, "inner_steps": 10, "num_class_images": 50},
    # What made protection hold (for a while) in the demo world (README "Protection that holds"): the
    # bounded target loss at the attacked weights, a persistent simulated attacker that sees
    # resync_every x inner_steps = 400 attack steps, clipped like DreamBooth, the protection gradient at
    # every 2nd attack step, only the cross-attention layers changed, and the distillation anchor
    # (add anchor_prompts for the classes you want kept). Learning rates stay the paper's (5e-6 on both
    # paths, as an SD1.5 DreamBooth attacker uses). Measured on the demo world only, not on SD1.5.
    "robust": {
        "loss": "target",
        "outer_steps": 100,
        "inner_steps": 20,
        "resync_every": 20,
        "protect_every": 2,
        "protect_layers": "cross_attention",
        "inner_max_grad_norm": 1.0,
        "anchor_weight": 3.0,
    },
    "thorough": {"outer_steps": 1200, "inner_steps": 20},
    # The paper's settings computed faster on a GPU (README "Performance"): bf16 autocast with fp32
    # master weights, a bf16 reference UNet, channels_last.
    "fast": {"mixed_precision": "bf16", "ref_precision": "bf16", "channels_last": True},
    # fast + everything that saves memory without changing the optimizer (estimate for SD1.5 at
    # 512 px in the README: about 16 GB).
    "low-memory": {
        "mixed_precision": "bf16",
        "ref_precision": "bf16",
        "gradient_checkpointing": True,
        "optimizer_in_backward": True,
        "offload_outer": True,
    },  # fmt: skip
    # low-memory + 8-bit AdamW moments for the simulated attacker (bitsandbytes, CUDA): fits 12 GB
    # for SD1.5 at 512 px by the estimate in the README.
    "low-memory-8bit": {
        "mixed_precision": "bf16",
        "ref_precision": "bf16",
        "gradient_checkpointing": True,
        "optimizer_in_backward": True,
        "offload_outer": True,
        "optimizer": "adamw8bit",
    },  # fmt: skip
}
