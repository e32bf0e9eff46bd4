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

This is the only module that knows Gradio, and it imports it only inside ``build_blocks`` /
``launch``, so importing it (the CLI does, to register ``apdm ui``) stays cheap and host-free.
"""

from __future__ import annotations

import contextlib
import html
import logging
import threading
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from .config import MODEL_TYPES, PATH_FIELDS, ProtectConfig
from .errors import APDMError, InputError
from .fileio import remove_work_dir
from .progress import ProgressEvent, format_seconds

log = logging.getLogger(__name__)

TITLE = "Anti-Personalize"
# Fields shown in the main panel; every other ProtectConfig field is in the Advanced accordion.
MAIN_FIELDS = ("model", "images", "instance_prompt", "class_prompt", "output")
# Fields that name files (PATH_FIELDS) are never on the page: a page served to a network must not
# read or write arbitrary paths. The cache and state files live in the host's default places.
ADVANCED_FIELDS = tuple(
    f.name for f in fields(ProtectConfig) if f.name not in MAIN_FIELDS and f.name not in PATH_FIELDS
)
# AttackConfig fields the page does not show: the models and images are the protection's, the
# report folder is the app's, the kind has its own dropdown; no file paths.
ATTACK_HIDDEN = ("kind", *PATH_FIELDS)
EVAL_HIDDEN = tuple(PATH_FIELDS)
UI_CHOICES = {"model_type": MODEL_TYPES}  # free text elsewhere (a config folder), a choice here
GROUP_TITLES = {"basic": "Main settings", "advanced": "Algorithm, optimizer, sampling", "io": "Files",
                "sampling": "Sampling", "metrics": "Metrics"}  # fmt: skip
BASIC_PRESETS = ("quick", "paper", "robust", "thorough", "fast", "low-memory")  # fast/low-memory: GPU presets
POLL_S = 0.5  # how often a running job's view is refreshed
CURVE_EVERY_S = 3.0  # how often a follower sends the loss curve image (redrawn only when it changed)


def _field(cls, name: str):
    return next(f for f in fields(cls) if f.name == name)


def _default(name: str, cls=ProtectConfig) -> Any:
    f = _field(cls, name)
    return f.default if f.default is not MISSING else f.default_factory()


def _base_type(cls, name: str) -> tuple[Any, bool]:
    """(the field's type without None, whether None is allowed)."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def form_value(cls, name: str, value: Any) -> Any:
    """A field's value as its page component shows it (lists as 'a, b', None as '')."""
    typ, _ = _base_type(cls, name)
    if typing.get_origin(typ) is list:
        return ", ".join(str(v) for v in value or [])
    return "" if value is None else value


def parse_field(cls, name: str, raw: Any) -> Any:
    """A component's value back as the field's type; InputError naming the setting when it is not one."""
    typ, optional = _base_type(cls, name)
    if typ is bool:
        return bool(raw)
    if typing.get_origin(typ) is list:
        item = typing.get_args(typ)[0]
        parts = raw if isinstance(raw, (list, tuple)) else str(raw or "").split(",")
        try:
            return [item(str(p).strip()) for p in parts if str(p).strip()]
        except ValueError as exc:
            raise InputError(
                f"Setting {name}={raw!r}: give {item.__name__} values separated by commas."
            ) from exc
    if raw is None or (isinstance(raw, str) and not raw.strip() and typ is not str):
        if optional:
            return None
        raise InputError(f"Setting {name} is empty; enter a value (default {_default(name, cls)!r}).")
    try:
        if typ is int:
            number = float(raw)
            if number != int(number):
                raise ValueError(raw)
            return int(number)
        return typ(raw) if typ in (float, str) else raw
    except (TypeError, ValueError) as exc:
        raise InputError(f"Setting {name}={raw!r} is not a valid {typ.__name__}.") from exc


def parse_fields(cls, names, raw_values) -> dict[str, Any]:
    return {name: parse_field(cls, name, raw) for name, raw in zip(names, raw_values)}


def attack_fields() -> tuple[str, ...]:
    from .attack import AttackConfig

    return tuple(f.name for f in fields(AttackConfig) if f.name not in ATTACK_HIDDEN)


def eval_fields() -> tuple[str, ...]:
    from .evaluate.config import EvalConfig

    return tuple(f.name for f in fields(EvalConfig) if f.name not in EVAL_HIDDEN)


def attack_prompts(instance_prompt: str, class_prompt: str) -> dict[str, str]:
    """The attacker's prompts following the protection's: the identifier is the instance prompt's
    first word that the class prompt lacks ('sks' in 'a photo of sks person' / 'a photo of person')."""
    class_words = set(str(class_prompt).split())
    extra = [w for w in str(instance_prompt).split() if w not in class_words]
    values = {"instance_prompt": str(instance_prompt), "class_prompt": str(class_prompt)}
    if extra:
        values["identifier"] = extra[0]
    return values


def _path_of(item: Any) -> str:
    """A file path from whatever an upload component hands over (str, Path, tempfile, dict)."""
    if isinstance(item, dict):
        item = item.get("path") or item.get("name") or ""
    return str(getattr(item, "name", item) or "")


# ------------------------------------------------------------------------------------------
# hosts
# ------------------------------------------------------------------------------------------
class Host:
    """The standalone app's behaviour; A1111/Forge override the hooks (scripts/apdm_tab.py)."""

    name = "standalone"
    presets: tuple[str, ...] = BASIC_PRESETS

    def __init__(
        self,
        model: str = "",
        images: str = "",
        output_dir: str | Path = "apdm_out/models",
        preset: str = "quick",
        config: dict[str, Any] | None = None,
        attack: dict[str, Any] | None = None,
        evaluation: dict[str, Any] | None = None,
        report_dir: str | Path = "apdm_out/reports",
    ) -> None:
        self.model, self.images, self.preset = model, images, preset
        self.output_dir, self.report_dir = Path(output_dir), Path(report_dir)
        # the page's first values (e.g. `apdm ui --config`); a preset click replaces the protection's
        self.config = dict(config or {})
        self.attack = dict(attack or {})
        self.evaluation = dict(evaluation or {})

    keep_on_device = True  # False: models go back to the CPU after each job (A1111 shares its GPU)

    # --- models and files --------------------------------------------------------------------
    def model_choices(self) -> list[str] | None:
        """Choices for a model dropdown, or None for a free path box."""
        return None

    def refresh_models(self) -> list[str] | None:
        return self.model_choices()

    def resolve_model(self, value: str) -> str:
        """The file or folder behind what the user picked."""
        return str(value or "").strip()

    def output_path(self, filename: str) -> Path:
        """Where Save writes: a name (sub-folders allowed) inside the app's output folder, nothing else."""
        from .fileio import child_path

        name = str(filename or "").strip()
        if not name:
            raise InputError("Give the protected model a file name (e.g. protected.safetensors) to save it.")
        return child_path(self.output_dir, name)

    def saved(self, path: Path) -> None:
        """Called after a model was written (A1111 refreshes its checkpoint list here)."""

    # --- running ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, kind: str) -> Iterator[None]:
        """Around every job, on its worker thread (A1111: GPU lock, free VRAM, shared.state)."""
        yield

    def progress(self, event: ProgressEvent) -> None:
        """Every progress event of a job (A1111 mirrors it into shared.state)."""

    def should_stop(self) -> bool:
        """A host-side interrupt (A1111: shared.state.interrupted)."""
        return False


# ------------------------------------------------------------------------------------------
# jobs
# ------------------------------------------------------------------------------------------
Work = Callable[[Callable[[ProgressEvent], None], Callable[[], bool]], Any]


class Job:
    """Runs ``work(progress, should_stop)`` on a daemon thread inside ``host.session``."""

    def __init__(self, kind: str, work: Work, host: Host, names: dict[str, str] | None = None) -> None:
        self.kind, self.host, self._work = kind, host, work
        self.names = dict(names or {})  # display names of loss series
        self._curve, self._curve_key = None, -1
        self.stop_requested = threading.Event()
        self.event: ProgressEvent | None = None
        self.curves: dict[str, list[tuple[int, dict[str, float]]]] = {}  # series -> (step, losses)
        self._series: dict[str, str] = {}  # stage -> its current series ("attack", then "attack #2")
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"apdm-{kind}", daemon=True)

    def start(self) -> Job:
        self._thread.start()
        return self

    def curve(self):
        """The loss curves as an image, redrawn only when new points arrived (followers share it)."""
        curves = {k: list(v) for k, v in dict(self.curves).items()}  # a snapshot: the worker appends
        key = sum(len(points) for points in curves.values())
        if key != self._curve_key:
            self._curve, self._curve_key = curve_image(curves, self.names), key
        return self._curve

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self.running

    def stop(self) -> None:
        self.stop_requested.set()

    def _progress(self, event: ProgressEvent) -> None:
        self.event = event
        if event.losses:
            series = self._series.get(event.stage)
            if series is None or self.curves[series][-1][0] >= event.step:  # new, or its counter restarted
                n = sum(1 for k in self.curves if k == event.stage or k.startswith(event.stage + " #"))
                series = self._series[event.stage] = event.stage if n == 0 else f"{event.stage} #{n + 1}"
                self.curves[series] = []
            self.curves[series].append((event.step, dict(event.losses)))
        self.host.progress(event)

    def _should_stop(self) -> bool:
        return self.stop_requested.is_set() or bool(self.host.should_stop())

    def _run(self) -> None:
        try:
            with self.host.session(self.kind):
                self.result = self._work(self._progress, self._should_stop)
        except BaseException as exc:  # shown in the UI; a worker thread has nobody else to tell
            self.error = exc
            if not isinstance(exc, APDMError):
                log.exception("APDM %s failed", self.kind)


def describe_error(exc: BaseException) -> str:
    """One line for the page: the engine's own message, or the exception with a hint."""
    if isinstance(exc, APDMError):
        return str(exc)
    if "out of memory" in str(exc).lower():
        return (
            f"Out of memory ({type(exc).__name__}). Reduce memory: mixed_precision=bf16, a smaller "
            "resolution, batch_size 1, or close other programs using the GPU."
        )
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------
# what the page shows
# ------------------------------------------------------------------------------------------
@dataclass
class View:
    """The state of the page's run area; ``build_blocks`` turns it into component updates."""

    status: str  # HTML
    running: bool = False
    curve: Any = None  # PIL image of the loss curves, or None to leave the shown one
    filename: str | None = None  # a suggested Save name once a protection finished
    done: bool = False  # the job this view follows has ended
    report: dict | None = None  # a finished test: grid / losses (PIL images), summary (Markdown), folder


def _status_html(message: str, event: ProgressEvent | None = None, kind: str = "info") -> str:
    colour = {"info": "inherit", "error": "#c0392b", "ok": "#1e8449"}[kind]
    parts = [f'<div class="apdm-status" style="color:{colour}">{html.escape(message)}</div>']
    if event is not None:
        parts.insert(
            0,
            f'<progress value="{event.step}" max="{max(event.total, 1)}" style="width:100%"></progress>'
            f'<div class="apdm-progress">{html.escape(event.describe())} · elapsed '
            f"{format_seconds(event.elapsed_s)}</div>",
        )
    return "".join(parts)


CURVE_POINTS = 300  # a long run's curve is averaged into at most this many points per series


def _binned(xs: list[float], ys: list[float], bins: int) -> tuple:
    """Average consecutive points into ``bins`` buckets (a 16,000-step run plots like a 300-step one)."""
    import numpy as np

    if len(xs) <= bins:
        return xs, ys
    edges = np.linspace(0, len(xs), bins + 1).astype(int)
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    return [x[a:b].mean() for a, b in zip(edges, edges[1:])], [
        y[a:b].mean() for a, b in zip(edges, edges[1:])
    ]


def curve_image(
    curves: dict[str, list[tuple[int, dict[str, float]]]], names: dict[str, str] | None = None,
    width: int = 640, height: int = 300,
):  # fmt: skip
    """The loss curves of a job as a PIL image (matplotlib's Agg canvas, no pyplot: thread safe).
    ``names``: display names of series ('attack #2' -> 'protected + attack')."""
    names = names or {}
    series = [(f"{names.get(stage, stage)}: {k}", pts) for stage, pts in curves.items()
              for k in (pts[-1][1] if pts else {})]  # fmt: skip
    if len(curves) == 1:  # one stage: the loss names alone say it
        series = [(label.split(": ", 1)[1], pts) for label, pts in series]
    if not series:
        return None
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    from PIL import Image

    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    fig.subplots_adjust(
        left=0.1, right=0.98, top=0.9, bottom=0.16
    )  # fixed: tight_layout costs more than the plot
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, pts in series:
        key = label.rsplit(": ", 1)[-1]
        xs, ys = _binned([s for s, v in pts if key in v], [v[key] for _, v in pts if key in v], CURVE_POINTS)
        ax.plot(xs, ys, label=label, linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("losses per step" + (f" (averaged into {CURVE_POINTS} points)" if max(len(p) for _, p in series)
                                      > CURVE_POINTS else ""), fontsize=9)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def report_view(folder: Path) -> dict:
    """What the page shows of a compare report folder: the grid, the loss plot, the Markdown table."""
    from PIL import Image

    def image(name):
        with Image.open(folder / name) as im:
            return im.convert("RGB")

    summary = (folder / "summary.md").read_text(encoding="utf-8")
    return {"grid": image("grid.png"), "losses": image("losses.png"), "summary": summary, "folder": folder}


# ------------------------------------------------------------------------------------------
# the event functions
# ------------------------------------------------------------------------------------------
class ProtectApp:
    """Everything the page does, as plain Python. One job at a time per app (one GPU)."""

    def __init__(self, host: Host | None = None) -> None:
        self.host = host or Host()
        self.job: Job | None = None
        self.protected = None  # the last finished ProtectResult (not cancelled)
        self._lock = threading.Lock()

    def shutdown(self, timeout: float = 120.0) -> bool:
        """Ask the running job (if any) to stop and wait until it saved its resumable state.

        Called when the app quits (Ctrl-C on ``apdm ui``): a protection or test stops within one
        step and keeps its state file, as with Cancel. Returns False when it did not stop in time.
        """
        job = self.job
        if job is None or not job.running:
            return True
        job.stop()
        return job.wait(timeout)

    # --- subject images ----------------------------------------------------------------------------
    @staticmethod
    def image_sources(files: Any, folder: str) -> list[str]:
        """Uploaded files plus the folder box (one path, or several separated by ';'), as ProtectConfig.images."""
        sources = [_path_of(f) for f in (files or [])]
        sources += [part.strip() for part in str(folder or "").split(";")]
        return [s for s in sources if s]

    def inspect_images(self, files: Any, folder: str) -> tuple[list, str]:
        """Gallery items (center square thumbnail, caption) and a Markdown list of the problems."""
        from .data import MIN_SIDE, center_square, find_images, open_image

        sources = self.image_sources(files, folder)
        if not sources:
            return [], "Upload 4-6 photos of the subject, or give a folder of them."
        items, notes, small = [], [], []
        try:
            paths = find_images(sources)
        except InputError as exc:
            return [], f"⚠ {exc}"
        for path in paths:
            try:
                image = open_image(path).convert("RGB")
            except InputError as exc:
                notes.append(f"⚠ {exc}")
                continue
            w, h = image.size  # shown as trained on: the center square (as a small thumbnail)
            items.append((center_square(image, min(256, w, h)), f"{path.name} ({w}x{h})"))
            if min(w, h) < MIN_SIDE:
                small.append(f"{path.name} ({w}x{h})")
        if small:
            notes.append(
                f"⚠ Smaller than {MIN_SIDE} px, too small for Stable Diffusion (fine for the tiny demo model): "
                + ", ".join(small)
            )
        if 0 < len(items) < 3:
            notes.append(f"⚠ Only {len(items)} usable image(s): protection generalises better with 4-6.")
        summary = f"{len(items)} image(s) ready." if items else "No usable image."
        return items, "\n\n".join([summary, *notes])

    # --- settings ------------------------------------------------------------------------------------
    def preset_values(self, preset: str) -> list[Any]:
        """The Advanced fields' values for a preset, in ADVANCED_FIELDS order."""
        values = ProtectConfig.from_preset(preset or "paper").to_dict()
        return [values[name] for name in ADVANCED_FIELDS]

    def initial_values(self) -> dict[str, Any]:
        """Every field's first value on the page: the host's preset, then the host's settings."""
        return {**ProtectConfig.from_preset(self.host.preset or "paper").to_dict(), **self.host.config}

    def initial_attack(self) -> dict[str, Any]:
        """The attack's first values: its defaults, the protection's prompts, then the host's settings."""
        from .attack import AttackConfig

        start = self.initial_values()
        prompts = attack_prompts(start["instance_prompt"], start["class_prompt"])
        return {**AttackConfig().to_dict(), **prompts, **self.host.attack}

    def initial_evaluation(self) -> dict[str, Any]:
        from .evaluate.config import EvalConfig

        return {**EvalConfig().to_dict(), **self.host.evaluation}

    def make_config(
        self, model: str, files: Any, folder: str, instance_prompt: str, class_prompt: str, advanced: dict
    ) -> ProtectConfig:
        """A validated ProtectConfig from the page's inputs (Advanced values by field name)."""
        values = {
            name: parse_field(ProtectConfig, name, advanced.get(name, _default(name)))
            for name in ADVANCED_FIELDS
        }
        model_path = self.host.resolve_model(model)
        if not model_path:
            raise InputError("Choose the model to protect (a checkpoint file or a diffusers folder).")
        images = self.image_sources(files, folder)
        if not images:
            raise InputError("Add the subject's photos: upload 4-6 images or give a folder of them.")
        from .data import find_images

        find_images(images)  # a missing folder or a non-image file fails here, before any loading
        return ProtectConfig(
            model=model_path,
            images=images,
            instance_prompt=str(instance_prompt or ""),
            class_prompt=str(class_prompt or ""),
            **values,
        )

    # --- jobs ----------------------------------------------------------------------------------------
    def busy_message(self) -> str | None:
        job = self.job
        if job is None or not job.running:
            return None
        where = f" ({job.event.stage} {job.event.step}/{job.event.total})" if job.event else ""
        return (
            f"A {job.kind} run is already in progress{where}. Wait for it to finish or press Cancel; "
            "its progress is shown here."
        )

    def _start(self, kind: str, work: Work, names: dict[str, str] | None = None) -> str | None:
        """Start a job unless one is running; returns the refusal message when refused."""
        with self._lock:
            busy = self.busy_message()
            if busy:
                return busy
            self.job = Job(kind, work, self.host, names).start()
            return None

    def start_protect(
        self, model, files, folder, instance_prompt, class_prompt, advanced: dict
    ) -> str | None:
        """Start protecting; returns a refusal message when a job is already running."""
        config = self.make_config(model, files, folder, instance_prompt, class_prompt, advanced)

        def work(progress, should_stop):
            from .protect import protect

            result = protect(config, progress=progress, should_stop=should_stop, resume=True)
            if not self.host.keep_on_device:
                result.model.to("cpu")
            if not result.cancelled:
                self.protected = result
            return result

        return self._start("protection", work)

    def make_test_configs(self, kind: str, attack_values: dict, eval_values: dict):
        """(AttackConfig, EvalConfig) from the page: the attack works on the protection's images."""
        from .attack import AttackConfig
        from .evaluate.config import EvalConfig

        attack = {name: parse_field(AttackConfig, name, raw) for name, raw in attack_values.items()}
        evaluation = {name: parse_field(EvalConfig, name, raw) for name, raw in eval_values.items()}
        return AttackConfig(kind=str(kind or "dreambooth"), **attack), EvalConfig(**evaluation)

    def start_test(self, kind: str, attack_values: dict, eval_values: dict) -> str | None:
        """Attack the unprotected and the protected model alike (evaluate.compare) and write a report."""
        if self.protected is None:
            raise InputError("Protect a model first: the test attacks the protected model and its original.")
        attack, evaluation = self.make_test_configs(kind, attack_values, eval_values)
        protected = self.protected
        stem = Path(protected.config.model).stem or "model"
        out = self.host.report_dir / f"{stem}-{attack.kind}-{time.strftime('%Y%m%d-%H%M%S')}"

        def work(progress, should_stop):
            from .evaluate.report import compare
            from .loading import load_model
            from .models import resolve_device

            source = protected.config
            base = load_model(
                source.model, device=resolve_device(attack.device), model_type=source.model_type
            )
            try:
                result = compare(base, protected.model, protected.config.images, attack, evaluation, out_dir=out,
                                 protection_history=protected.history, progress=progress,
                                 should_stop=should_stop)  # fmt: skip
            finally:
                if not self.host.keep_on_device:
                    protected.model.to("cpu")
            if result.cancelled and result.work_dir is not None:  # a new test starts over: keep nothing
                remove_work_dir(result.work_dir)
            return result

        from .evaluate.report import ARM_LABELS, ARMS

        # compare attacks the arms in turn; each restarts the attack's step counter (Job: a new series)
        names = {"attack" if i == 0 else f"attack #{i + 1}": ARM_LABELS[arm] for i, arm in enumerate(ARMS)}
        return self._start("test", work, names)

    def cancel(self) -> str:
        job = self.job
        if job is None or not job.running:
            return "Nothing is running."
        job.stop()
        return f"Stopping the {job.kind} run after the current step…"

    # --- views ---------------------------------------------------------------------------------------
    def view(self) -> View:
        """The run area for the current (or last) job."""
        job = self.job
        if job is None:
            return View(_status_html("Ready. Choose a model and the subject's photos, then press Protect."))
        if job.running:
            note = (
                "Stopping after the current step…" if job.stop_requested.is_set() else f"{job.kind} running"
            )
            return View(_status_html(note, job.event), running=True)
        return self._finished_view(job)

    def _finished_view(self, job: Job) -> View:
        curve = job.curve()
        if job.error is not None:
            return View(_status_html(describe_error(job.error), job.event, "error"), curve=curve, done=True)
        result = job.result
        if job.kind == "protection":
            if result.cancelled:
                msg = (
                    f"Stopped after {result.steps_done}/{result.config.outer_steps} outer steps; the state is "
                    "saved: press Protect with the same settings to continue."
                )
                return View(_status_html(msg, job.event), curve=curve, done=True)
            msg = (
                f"Protected in {format_seconds(result.seconds)} ({result.steps_done} outer steps). "
                "Test it below, or save it."
            )
            return View(
                _status_html(msg, job.event, "ok"), curve=curve, filename=self.suggest_filename(), done=True
            )
        if result.cancelled:
            return View(_status_html("Test stopped; nothing was kept.", job.event), curve=curve, done=True)
        report = report_view(result.out_dir)
        msg = f"Report written to {result.out_dir}."
        return View(_status_html(msg, job.event, "ok"), curve=curve, report=report, done=True)

    def follow(self, first: str | None = None) -> Iterator[View]:
        """Views of the current job until it ends: one every POLL_S, the loss curve every CURVE_EVERY_S."""
        job = self.job
        if job is None:
            yield self.view()
            return
        last_curve = 0.0
        while job.running:
            view = self.view()
            if first:
                view.status = _status_html(first) + view.status
            now = time.monotonic()
            if now - last_curve >= CURVE_EVERY_S:
                view.curve, last_curve = job.curve(), now
            yield view
            job.wait(POLL_S)
        yield self._finished_view(job)

    def protect_events(
        self, model, files, folder, instance_prompt, class_prompt, *advanced
    ) -> Iterator[View]:
        """Protect button: start (or politely refuse and show the running job), then stream views."""
        try:
            refused = self.start_protect(
                model, files, folder, instance_prompt, class_prompt, dict(zip(ADVANCED_FIELDS, advanced))
            )
        except APDMError as exc:
            yield View(_status_html(str(exc), kind="error"), done=True)
            return
        yield from self.follow(refused)

    def test_events(self, kind, *values) -> Iterator[View]:
        """Test button: attack both models (AttackConfig fields, then EvalConfig fields), stream views."""
        names_a, names_e = attack_fields(), eval_fields()
        try:
            refused = self.start_test(
                kind, dict(zip(names_a, values[: len(names_a)])), dict(zip(names_e, values[len(names_a) :]))
            )
        except APDMError as exc:
            yield View(_status_html(str(exc), kind="error"), done=True)
            return
        yield from self.follow(refused)

    # --- save ----------------------------------------------------------------------------------------
    def suggest_filename(self) -> str:
        if self.protected is None:
            return ""
        source = Path(self.protected.config.model)
        if source.suffix.lower() in (".safetensors", ".ckpt"):
            return f"{source.stem}-apdm.safetensors"
        return f"{source.name}-apdm"

    def save(self, filename: str) -> str:
        """Write the last protected model (a .safetensors name -> single file, else a diffusers folder)."""
        from .protect import write_output

        if self.job is not None and self.job.running:
            return "Wait for the running job to finish before saving."
        if self.protected is None:
            return "Nothing to save yet: protect a model first."
        try:
            path = self.host.output_path(filename or self.suggest_filename())
            out = write_output(self.protected.model, self.protected.config, path)
        except APDMError as exc:
            return f"⚠ {exc}"
        self.host.saved(out)
        return f"Saved to {out}"


# ------------------------------------------------------------------------------------------
# the Gradio layer
# ------------------------------------------------------------------------------------------
INTRO = (
    "### APDM: protect a model against personalization\n"
    "Pick a model and 4-6 photos of the subject, press **Protect**; then test that DreamBooth on the "
    "protected model fails, and save it. ([paper](https://arxiv.org/abs/2511.01307))"
)


def _gradio_major(gr) -> int:
    return int(str(gr.__version__).split(".", 1)[0])


def _event_options(gr) -> dict:
    """Event arguments for long streams: Gradio >= 4 lets them run beside each other so that a second
    click reaches the app (which refuses it politely) instead of waiting in the queue."""
    return {"concurrency_limit": None} if _gradio_major(gr) >= 4 else {}


def _field_component(gr, cls, name: str, value: Any, prefix: str = "apdm_", choices=None):
    """One component for one config field: its help as info, its choices as a dropdown."""
    meta = _field(cls, name).metadata
    typ, optional = _base_type(cls, name)
    info = meta["help"] + (" Empty = the default." if optional else "")
    kw = {"label": name, "info": info, "elem_id": f"{prefix}{name}"}
    choices = choices or meta.get("choices") or UI_CHOICES.get(name)
    if choices:
        return gr.Dropdown(choices=list(choices), value=value, **kw)
    if typ is bool:
        return gr.Checkbox(value=bool(value), **kw)
    if typ in (int, float) and not optional:
        return gr.Number(value=value, precision=0 if typ is int else None, **kw)
    return gr.Textbox(value=form_value(cls, name, value), **kw)


def _field_group(gr, cls, names, values: dict, prefix: str) -> list:
    """The fields ``names`` of ``cls`` under their group titles; the components in ``names`` order."""
    made = {}
    for group in dict.fromkeys(_field(cls, n).metadata["group"] for n in names):
        gr.Markdown(f"**{GROUP_TITLES.get(group, group.capitalize())}**")
        for name in names:
            if _field(cls, name).metadata["group"] == group:
                made[name] = _field_component(gr, cls, name, values[name], prefix)
    return [made[name] for name in names]


def build_blocks(app: ProtectApp | None = None):
    """The whole page as a gr.Blocks (A1111 renders it in a tab; ``launch`` serves it alone)."""
    import gradio as gr

    from .attack import AttackConfig, registered_attacks
    from .evaluate.config import EvalConfig

    app = app or ProtectApp()
    host = app.host
    start, start_attack, start_eval = app.initial_values(), app.initial_attack(), app.initial_evaluation()
    names_a, names_e = attack_fields(), eval_fields()
    meta = {f.name: f.metadata for f in fields(ProtectConfig)}

    def updates(view: View) -> tuple:
        report = view.report or {}
        keep = gr.update()
        return (
            gr.update(value=view.status),
            gr.update(value=view.curve) if view.curve is not None else keep,
            gr.update(interactive=not view.running),
            gr.update(interactive=not view.running),
            gr.update(interactive=view.running),
            gr.update(value=view.filename) if view.filename else keep,
            gr.update(value=report["grid"]) if report else keep,
            gr.update(value=report["losses"]) if report else keep,
            gr.update(value=report["summary"]) if report else keep,
        )

    with gr.Blocks(analytics_enabled=False, title=f"APDM {TITLE}") as blocks:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                choices = host.model_choices()
                refresh = None
                if choices is None:
                    model = gr.Textbox(
                        label="Model", value=host.model, info=meta["model"]["help"], elem_id="apdm_model"
                    )
                else:
                    with gr.Row():
                        model = gr.Dropdown(
                            choices=choices,
                            label="Checkpoint",
                            elem_id="apdm_model",
                            value=host.model if host.model in choices else (choices[0] if choices else None),
                        )
                        refresh = gr.Button("Refresh list", elem_id="apdm_refresh_models")
                files = gr.File(
                    label="Subject images (4-6 photos)", file_count="multiple", file_types=["image"]
                )
                folder = gr.Textbox(
                    label="…or a folder of subject images (several paths: separate them with ;)",
                    value=host.images,
                    elem_id="apdm_folder",
                )
                gallery = gr.Gallery(
                    label="Subject images as they will be used", columns=6, height=240, elem_id="apdm_gallery"
                )
                image_notes = gr.Markdown(elem_id="apdm_image_notes")
                instance = gr.Textbox(
                    label="Instance prompt",
                    value=start["instance_prompt"],
                    info=meta["instance_prompt"]["help"],
                    elem_id="apdm_instance_prompt",
                )
                klass = gr.Textbox(
                    label="Class prompt",
                    value=start["class_prompt"],
                    info=meta["class_prompt"]["help"],
                    elem_id="apdm_class_prompt",
                )
                preset = gr.Radio(
                    choices=list(host.presets),
                    value=host.preset or None,  # none selected: the page opened on its own settings
                    label="Preset",
                    elem_id="apdm_preset",
                    info="quick: a first look (100 x 10 steps); paper: the paper's settings (800 x 20); "
                    "robust: the levers that held in the demo world (README, Protection that holds); "
                    "thorough: 1200 x 20. Fills the Advanced settings.",
                )
                with gr.Accordion("Advanced", open=False):
                    advanced = _field_group(gr, ProtectConfig, ADVANCED_FIELDS, start, "apdm_")
            with gr.Column():
                with gr.Row():
                    protect_btn = gr.Button("Protect", variant="primary", elem_id="apdm_protect")
                    cancel_btn = gr.Button("Cancel", interactive=False, elem_id="apdm_cancel")
                status = gr.HTML(app.view().status, elem_id="apdm_status")
                curve = gr.Image(label="Losses", type="pil", interactive=False, elem_id="apdm_curve")
                gr.Markdown(
                    "**Test personalization**: attack the original and the protected model the same "
                    "way and compare (report grid, loss curves, metrics)."
                )
                with gr.Row():
                    kind = gr.Dropdown(
                        choices=list(registered_attacks()),
                        value=start_attack["kind"],
                        label="Attack",
                        info=_field(AttackConfig, "kind").metadata["help"],
                        elem_id="apdm_attack_kind",
                    )
                    test_btn = gr.Button("Test personalization", elem_id="apdm_test")
                with gr.Accordion("Attack and evaluation settings", open=False):
                    attack_inputs = _field_group(gr, AttackConfig, names_a, start_attack, "apdm_attack_")
                    eval_inputs = _field_group(gr, EvalConfig, names_e, start_eval, "apdm_eval_")
                grid = gr.Image(
                    label="Samples after the attack", type="pil", interactive=False, elem_id="apdm_grid"
                )
                losses = gr.Image(label="Loss curves", type="pil", interactive=False, elem_id="apdm_losses")
                summary = gr.Markdown(elem_id="apdm_summary")
                gr.Markdown(f"**Save** (into `{host.output_dir}`; a `.safetensors` name writes one file)")
                with gr.Row():
                    filename = gr.Textbox(label="File name", elem_id="apdm_filename")
                    save_btn = gr.Button("Save", elem_id="apdm_save")
                saved = gr.Markdown(elem_id="apdm_saved")  # fmt: skip

        run_outputs = [status, curve, protect_btn, test_btn, cancel_btn, filename, grid, losses, summary]
        attack_prompt_inputs = [
            attack_inputs[names_a.index(n)] for n in ("instance_prompt", "class_prompt", "identifier")
        ]

        def stream(events):
            def run(*values):
                for view in events(*values):
                    yield updates(view)

            return run

        def on_cancel():
            app.cancel()
            return updates(app.view())[0]

        def on_inspect(files_value, folder_value):
            items, notes = app.inspect_images(files_value, folder_value)
            return gr.update(value=items), gr.update(value=notes)

        def on_prompts(instance_prompt, class_prompt):
            values = attack_prompts(instance_prompt, class_prompt)
            return [
                gr.update(value=values[n]) if n in values else gr.update()
                for n in ("instance_prompt", "class_prompt", "identifier")
            ]

        def on_save(name):
            message = app.save(name)
            refreshed = host.model_choices() if refresh is not None else None
            return gr.update(value=message), (
                gr.update(choices=refreshed) if refreshed is not None else gr.update()
            )

        streaming = {"outputs": run_outputs, "show_progress": "hidden", **_event_options(gr)}
        protect_btn.click(
            stream(app.protect_events), inputs=[model, files, folder, instance, klass, *advanced], **streaming
        )
        test_btn.click(stream(app.test_events), inputs=[kind, *attack_inputs, *eval_inputs], **streaming)
        cancel = cancel_btn.click(on_cancel, inputs=None, outputs=status, queue=False)
        cancel.then(stream(app.follow), inputs=None, **streaming)  # a reloaded page sees the stop too
        blocks.load(stream(app.follow), inputs=None, **streaming)  # a (re)loaded page follows a running job
        preset.change(
            lambda p: [gr.update(value=v) for v in app.preset_values(p)], inputs=preset, outputs=advanced
        )
        for box in (instance, klass):  # the attacker personalizes the same subject, with the same words
            box.change(on_prompts, inputs=[instance, klass], outputs=attack_prompt_inputs)
        for event in (files.change, folder.submit, folder.blur):
            event(on_inspect, inputs=[files, folder], outputs=[gallery, image_notes])
        blocks.load(on_inspect, inputs=[files, folder], outputs=[gallery, image_notes])
        save_btn.click(on_save, inputs=filename, outputs=[saved, model])
        if refresh is not None:
            refresh.click(lambda: gr.update(choices=host.refresh_models()), inputs=None, outputs=model)  # fmt: skip
    blocks.apdm_app = app  # for tests and hosts that want the event functions
    return blocks


# ------------------------------------------------------------------------------------------
# the standalone app: `apdm ui`
# ------------------------------------------------------------------------------------------
def page_host(model: str, images: str, output_dir: str | Path, config: ProtectConfig | None) -> Host:
    """The standalone page: the `quick` preset selected, or, when the page opens on settings
    (`apdm ui --config FILE`, `--demo`), those settings and no preset selected."""
    values = config.to_dict() if config is not None else {}
    config_model, config_images = values.pop("model", ""), values.pop("images", [])
    model, images = model or config_model, images or "; ".join(config_images)
    return Host(
        model=model, images=images, output_dir=output_dir, preset="" if values else "quick", config=values
    )


def launch(
    host: str = "127.0.0.1",
    port: int | None = None,
    model: str = "",
    images: str = "",
    output_dir: str | Path = "apdm_out/models",
    config: ProtectConfig | None = None,
    block: bool = True,
    auth: tuple[str, str] | None = None,
):
    """Serve the app on ``host:port`` (127.0.0.1 by default: this machine only), with Gradio's
    login when ``auth`` = (user, password). When the server stops (Ctrl-C), a running job is
    asked to stop and keeps its resumable state."""
    app = ProtectApp(page_host(model, images, output_dir, config))
    blocks = build_blocks(app)
    blocks.queue()
    try:
        blocks.launch(server_name=host, server_port=port, prevent_thread_lock=not block, auth=auth)
    finally:
        if block:  # the server is gone: do not let a daemon thread die mid-step without its state
            if not app.shutdown():
                log.warning("The running job did not stop in time; its last saved state is kept.")
    return blocks


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_auth(args) -> tuple[str, str] | None:
    """(user, password) from --auth USER:PASS; a non-local --host needs --auth or an explicit --no-auth."""
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise InputError(
                "--auth must be USER:PASSWORD (both non-empty), e.g. --auth alice:correct-horse."
            )
        return user, password
    if args.host not in LOCAL_HOSTS and not args.no_auth:
        raise InputError(
            f"--host {args.host} lets anyone who can reach this machine read and write files through the app: "
            "add --auth USER:PASSWORD (Gradio's login), or --no-auth if the network is yours alone."
        )
    return None


def cmd_ui(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise APDMError("The app needs gradio: pip install -c constraints.txt gradio") from exc
    auth = parse_auth(args)
    if args.host not in LOCAL_HOSTS and auth is None:
        print(
            f"apdm ui: listening on {args.host} without a login (--no-auth): anyone who can reach it can use it."
        )
    config = ProtectConfig.load(args.config) if args.config else None
    if args.demo:  # the demo world's model, subject photos and settings (as `apdm demo`)
        from pathlib import Path

        from .demo import demo_configs, write_subject_photos

        folder = Path(args.out_dir).parent / "demo"
        config, _, _ = demo_configs(folder, write_subject_photos(folder / "subject"))
        config.output = ""
    launch(args.host, args.port, args.model or "", args.images or "", args.out_dir, config, auth=auth)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "ui", help="Open the APDM app in the browser (Gradio; 127.0.0.1 only by default)."
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="Interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0 = every interface).",
    )
    p.add_argument("--port", type=int, default=None, help="Port (default: the first free one from 7860).")
    p.add_argument("--auth", default="", metavar="USER:PASS", help="Require this login (Gradio's auth).")
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="Listen on a non-local --host without a login (trusted networks).",
    )
    p.add_argument("--model", default="", help="Model to open on: a diffusers folder or a .safetensors file.")
    p.add_argument("--images", default="", help="Folder of subject images to open on.")
    p.add_argument(
        "--demo",
        action="store_true",
        help="Open on the built-in demo world: its model, the demo subject's photos and the demo settings.",
    )
    p.add_argument(
        "--config", help="Open on the settings of a JSON/YAML file (`apdm config`, --save-config)."
    )
    p.add_argument(
        "--out-dir", default="apdm_out/models", help="Where Save writes (default apdm_out/models)."
    )
    p.set_defaults(func=cmd_ui)
