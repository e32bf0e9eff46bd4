"""The APDM Gradio UI: one Blocks for the AUTOMATIC1111/Forge "Anti-Personalize" tab and `apdm ui`.

- ``Host``: what differs between the two homes (model list, output folder, GPU lock, progress
  and interrupt). The standalone app uses ``Host`` itself; ``scripts/apdm_tab.py`` subclasses it
  for A1111/Forge (``modules.shared.state``, ``sd_models``).
- ``Job``: a long task (protection, a personalization test: ``evaluate.compare``) on a worker
  thread with progress and a stop flag, so neither the UI thread nor the browser ever waits on it.
- ``ProtectApp``: the event functions, plain Python without Gradio (tested headless). Streams
  of ``View`` objects describe what the page shows while a job runs.
- ``build_blocks``: the layout and the wiring, written against the subset of the Gradio API
  that works in 3.41 (A1111 1.10), 4.x (Forge) and the current release: no ``.style()``, no
  ``_js``/``js``, no arguments removed or added since 3.41 (except behind ``_event_options``).

One concern per file: ``forms`` (fields <-> text), ``host``, ``jobs`` (``Job``, ``View``), ``view``
(status line, loss-curve image, report folder), ``app`` (``ProtectApp``), ``layout``
(``build_blocks``), ``cli`` (``apdm ui``, ``launch``). This is the only package that knows Gradio,
and it imports it only inside ``build_blocks`` / ``launch``, so importing it (the CLI does, to
register ``apdm ui``) stays cheap and host-free.
"""

from __future__ import annotations

from .app import CURVE_EVERY_S, POLL_S, ProtectApp
from .cli import LOCAL_HOSTS, cmd_ui, launch, page_host, parse_auth, register_cli
from .forms import (
    ADVANCED_FIELDS,
    BASIC_PRESETS,
    MAIN_FIELDS,
    TITLE,
    attack_fields,
    attack_prompts,
    eval_fields,
    form_value,
    parse_field,
    parse_fields,
)
from .host import Host, Work
from .jobs import Job, View, describe_error
from .layout import build_blocks
from .view import LossCurves, curve_image, report_view

__all__ = [
    "ADVANCED_FIELDS",
    "BASIC_PRESETS",
    "CURVE_EVERY_S",
    "LOCAL_HOSTS",
    "MAIN_FIELDS",
    "POLL_S",
    "TITLE",
    "Host",
    "Job",
    "LossCurves",
    "ProtectApp",
    "View",
    "Work",
    "attack_fields",
    "attack_prompts",
    "build_blocks",
    "cmd_ui",
    "curve_image",
    "describe_error",
    "eval_fields",
    "form_value",
    "launch",
    "page_host",
    "parse_auth",
    "parse_field",
    "parse_fields",
    "register_cli",
    "report_view",
]
