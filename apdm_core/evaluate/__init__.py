"""Evaluate personalization attacks: sampling, metrics (a registry of small adapters) and the report.

``evaluate(model, references, EvalConfig())`` samples a model with the paper's prompts and
computes the metrics; ``compare(base, protected, images, AttackConfig(...), out_dir=...)`` runs
the same attack on both models and writes report.json, grid.png, losses.png and summary.md.
``register_metric(name, fn, protected_if=...)`` adds a metric (e.g. a demo world's identity check).
"""

from __future__ import annotations

from . import face  # noqa: F401  (registers the face and fdfr metrics)
from .config import EvalConfig
from .core import EvalResult, evaluate, generate_samples
from .metrics import (
    MetricContext,
    MetricResult,
    MetricSkipped,
    compute_metrics,
    register_metric,
    registered_metrics,
)
from .prompts import PROMPT_LISTS, sample_prompts
from .report import CompareResult, compare

__all__ = [
    "PROMPT_LISTS",
    "CompareResult",
    "EvalConfig",
    "EvalResult",
    "MetricContext",
    "MetricResult",
    "MetricSkipped",
    "compare",
    "compute_metrics",
    "evaluate",
    "generate_samples",
    "register_metric",
    "registered_metrics",
    "sample_prompts",
]
