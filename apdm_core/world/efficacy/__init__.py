"""Does protection work? The efficacy benchmark of the demo world (``benchmarks/efficacy.py``).

For a subject of the world (never seen in pretraining) and a seed, every *row* takes a model
(the world model, the world model with a randomly initialised UNet, or the world model
protected against the subject), attacks it (DreamBooth, or a variant the protection did not
simulate), samples "a photo of <identifier> <class>" and scores the samples with the world's
identity evaluator against held-out photos of the subject (photos neither the protector nor
the attacker had). One attack run gives the whole attack-budget curve: the samples are scored
after each of the requested numbers of attack steps (``budgets``).

The yardstick (README, Demo world):

- ``gated`` similarity: the evaluator's subject similarity per sample, counted as 0 for a
  sample not recognised as the subject's class (so garbage never looks like the subject);
- ``scratch+<attack>``: the same attack on the world model whose UNet was replaced by a
  randomly initialised one (VAE and text encoder kept): what the attacker gets without our
  model. No model-level protection can be asked to do better than that;
- ``reset_<part>+<attack>`` (``RESETS``): the world model with only some UNet parameters taken from
  that random UNet: the ceiling of a protection confined to those parameters, if all it did was
  remove what they knew;
- ``efficiency`` of a protected row = (unprotected - protected) / (unprotected - scratch)
  gated similarity after the same attack, per subject and seed: 0 = no protection, 1 = the
  attacker gains nothing from the protected model over a random one;
- utility: class-prompt samples of the protected model (before any attack) recognised as
  their class (``class_quality`` for the subject's class, ``unrelated_quality`` for the three
  others), and ``+other_subject`` rows: another individual of the same class must still be
  learned by the attacker.

Everything runs through the public engine: ``apdm_core.protection.protect``,
``apdm_core.attack.run_attack``, ``apdm_core.pairs.sample_images``. Protected models are
shared between the rows that only change the attack.

Layout: ``rows`` (the rows and their settings), ``baselines`` (the random UNet, partial resets), ``runner`` (``Runner``, ``Cell``, the results cache),
``summary`` (efficiency, curves, break-even, frontier), ``report`` (Markdown tables, figures).
"""

from __future__ import annotations

from .baselines import reset_model, scratch_model, soup_model
from .cells import Cell, ResultCache, cells_from_dicts, cells_to_dicts, evaluator_fingerprint
from .report import markdown_comparison, markdown_table, markdown_worst_case, plot_curves, plot_frontier
from .rows import *  # noqa: F403  (the rows and their settings: efficacy.PROTECT_SETTINGS, ...)
from .rows import __all__ as _rows_all
from .runner import (
    Runner,
    WorldJudge,
    class_quality,
    method_success,
    score_samples,
    unet_vector,
    view_prompt_map,
)
from .summary import (
    best_of,
    break_even,
    curve_points,
    curve_summary,
    efficiency_at,
    frontier,
    report_mean,
    row_of,
    standard_cells,
    summarize,
    twin,
    unprotected_twin,
    utility_ratios,
    worst_case,
)

__all__ = [
    *_rows_all,
    "Cell",
    "ResultCache",
    "Runner",
    "WorldJudge",
    "method_success",
    "best_of",
    "report_mean",
    "break_even",
    "cells_from_dicts",
    "cells_to_dicts",
    "class_quality",
    "curve_points",
    "curve_summary",
    "evaluator_fingerprint",
    "frontier",
    "markdown_comparison",
    "markdown_table",
    "markdown_worst_case",
    "efficiency_at",
    "worst_case",
    "plot_curves",
    "plot_frontier",
    "reset_model",
    "soup_model",
    "row_of",
    "scratch_model",
    "score_samples",
    "standard_cells",
    "summarize",
    "twin",
    "unet_vector",
    "unprotected_twin",
    "utility_ratios",
    "view_prompt_map",
]
