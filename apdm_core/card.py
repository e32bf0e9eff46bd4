"""What a protected checkpoint says about itself: what its protection was measured to resist, and a
model card in Hugging Face's layout.

- ``measured_record(report)``: one protection test (``evaluate.compare``) as a record: the attack,
  per metric the unprotected model before and after the attack and the protected model after it,
  the efficiency, and what the protection cost (the utility rows). ``compare`` adds it to the
  protected model's ``info["measured"]``; every export writes the records into the safetensors
  metadata (``apdm.measured``) or ``apdm_measured.json`` of a folder, and into the card.
- ``model_card(...)``: README.md for a folder export, ``<name>.md`` beside a single file: the method,
  its settings (no paths; the instance prompt hashed), the measured rows, the threat model in short.
- ``format_measured(records)``: the rows as text (``apdm compare`` and ``apdm inspect`` print them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import __version__

MEASURED_FILE = "apdm_measured.json"
CARD_FILE = "README.md"
ATTACK_KEYS = ("kind", "steps", "lr", "batch_size", "prior_weight")  # no identifier: it may name the subject


def measured_record(report: dict) -> dict[str, Any]:
    """A compare report as a record for the checkpoint (no paths, no prompts with the identifier)."""
    cfg = report["attack_config"]
    attack = {k: cfg.get(k) for k in ATTACK_KEYS}
    if cfg.get("kind") == "lora":
        attack["lora_rank"] = cfg.get("lora_rank")
    metrics = {
        r["metric"]: {
            k: r.get(k) for k in ("unattacked", "unprotected", "protected", "efficiency", "protected_if")
        }
        for r in report["metrics"]
        if r.get("unprotected") is not None and r.get("protected") is not None
    }
    return {"date": report.get("created"), "tool": f"apdm {report.get('apdm_version', __version__)}", "attack": attack,
            "metrics": metrics, "utility": report.get("utility", [])}  # fmt: skip


def card_path(output: str | Path) -> Path:
    """Where an export's model card goes: README.md inside a folder, ``<name>.md`` beside a single file."""
    output = Path(output)
    if output.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        return output.with_suffix(".md")
    return output / CARD_FILE


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def measured_rows(records: list[dict]) -> list[str]:
    """One Markdown table row per (test, metric)."""
    rows = []
    for rec in records:
        a = rec.get("attack", {})
        attack = f"{a.get('kind')} {a.get('steps')} steps, lr {_fmt(a.get('lr'))}" + (
            f", rank {a['lora_rank']}" if a.get("lora_rank") else ""
        )
        for name, m in rec.get("metrics", {}).items():
            rows.append(f"| {attack} | {name} | {_fmt(m.get('unattacked'))} | {_fmt(m.get('unprotected'))} "
                        f"| {_fmt(m.get('protected'))} | {_fmt(m.get('efficiency'))} | {(rec.get('date') or '')[:10]} |")  # fmt: skip
    return rows


MEASURED_HEAD = [
    "| attack | metric | unprotected, no attack | unprotected + attack | protected + attack | efficiency | date |",
    "| --- | --- | --- | --- | --- | --- | --- |",
]


def format_measured(records: list[dict]) -> str:
    """What the checkpoint was measured to resist, as a Markdown table ('' when nothing was measured)."""
    if not records:
        return ""
    lines = ["What this checkpoint's protection was measured to resist (apdm compare):", "", *MEASURED_HEAD,
             *measured_rows(records)]  # fmt: skip
    for rec in records:
        for u in rec.get("utility") or []:
            q = u.get("quality") or {}
            lines.append(f"- no attack, \"{u['prompt']}\": similarity to the unprotected model {u['similarity']:.3f}"
                         + (f", quality {_fmt(q.get('unprotected'))} -> {_fmt(q.get('protected'))}" if q else ""))  # fmt: skip
    return "\n".join(lines)


def model_card(
    title: str, method: str, settings: dict | None, measured: list[dict], subjects: dict | None
) -> str:
    """The model card (Hugging Face layout: YAML front matter, then Markdown) of a protected export."""
    count = (subjects or {}).get("count")
    front = ["---", "library_name: diffusers", "tags:", "- stable-diffusion", "- apdm", "- anti-personalization",
             "- protected", "---", ""]  # fmt: skip
    lines = [
        *front,
        f"# {title} (protected with APDM)",
        "",
        f"This checkpoint was changed by [apdm]({'https://arxiv.org/abs/2511.01307'}) {__version__} so that "
        f"personalizing it on {count or 'some'} protected subject(s) (DreamBooth-style fine-tuning on their photos) "
        "learns less of them, while everything else should still generate and personalize as before.",
        "",
        "## Protection",
        "",
        f"Method: {method}.",
        "",
    ]
    if settings:
        lines += ["| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(settings.items())]
        lines.append("")
    lines += ["## Measured", ""]
    if measured:
        lines += [
            "Each row: one attack run the same way on the unprotected and this model (`apdm compare`). Efficiency: the "
            "share of the attack's change on the unprotected model that the protection took away (1 = after the "
            "attack the protected model is where the unprotected one started, 0 = no protection).",
            "",
            *MEASURED_HEAD,
            *measured_rows(measured),
            "",
        ]
    else:
        lines += ["No protection test was run before this export (`apdm compare`, the Test Personalization node or "
                  "the tab's Test personalization add one).", ""]  # fmt: skip
    lines += [
        "## What the protection promises, and what it does not",
        "",
        "- It is meant for a model whose unprotected original the attacker cannot get: with the original, "
        "the protection is void.",
        "- It makes personalization of the protected subjects slower, not impossible: an attacker who fine-tunes "
        "long enough (or with other settings than those measured) learns the subject. The apdm README's "
        '"Protection that holds" section reports how much longer, and against which attackers, on its demo world.',
        "- The subjects are recorded as salted hashes only (`apdm inspect --subjects PHOTOS` checks a photo).",
        "",
    ]
    return "\n".join(lines)


def format_rounds(record: dict | None) -> str:
    """The protected subjects a checkpoint records, round by round (a subject added to a protected model
    is a new round; the earlier ones stay listed): '' for a record of nothing."""
    if not isinstance(record, dict) or "hashes" not in record:
        return ""
    rounds = [*record.get("earlier", []), record]
    lines = ["Protected subjects (stored as salted hashes; `apdm inspect --subjects PHOTOS` checks photos):"]
    for i, r in enumerate(rounds, 1):
        when = f", {str(r['created'])[:10]}" if r.get("created") else ""
        method = f", {r['method']}" if r.get("method") else ""
        lines.append(
            f"- round {i}: {r.get('count')} photos of {r.get('subjects', 1)} subject(s){method}{when}"
        )
    return "\n".join(lines)


# ModelSpec (Stability AI's sai_model_spec 1.0.0, what hosts and trainers read): the architecture of each
# model type apdm writes, as kohya's sd-scripts names them
MODELSPEC_ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sdxl-v": "stable-diffusion-xl-v1-base",  # the prediction type is its own modelspec key
}


def modelspec(
    source_meta: dict[str, str],
    model_type: str,
    prediction_type: str,
    title: str,
    created: str,
    protected: bool,
    subjects: int | None = None,
    thumbnail: str | None = None,
) -> dict[str, str]:
    """The modelspec.* keys of an export: the source's own (author, license, ...) with the architecture,
    prediction type and date set, and a title and description that say the file is protected with
    APDM (a protected file never presents itself with the source's title)."""
    spec = {k: v for k, v in source_meta.items() if k.startswith("modelspec.")}
    base_title = spec.get("modelspec.title") or title
    spec.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURES.get(model_type, model_type),
        "modelspec.implementation": "diffusers",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": created,
    })  # fmt: skip
    if protected:
        spec["modelspec.title"] = f"{base_title} (protected with APDM)"
        spec["modelspec.description"] = (
            f"{base_title}, changed by apdm {__version__} so that personalizing it on "
            f"{subjects or 'its protected'} subject(s) learns less of them (model-level protection against "
            "unauthorized personalization; see the apdm.* keys and the model card)."
        )
    else:
        spec["modelspec.title"] = base_title
    if thumbnail:
        spec["modelspec.thumbnail"] = thumbnail
    return spec
