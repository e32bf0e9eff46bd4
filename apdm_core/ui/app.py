"""The event functions of the page, plain Python without Gradio (tested headless)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import ProtectConfig
from ..errors import APDMError, InputError
from ..fileio import remove_work_dir
from ..progress import format_seconds
from .forms import (
    ADVANCED_FIELDS,
    _default,
    _path_of,
    attack_fields,
    attack_prompts,
    eval_fields,
    parse_field,
)
from .host import Host, Work
from .jobs import Job, View, describe_error
from .view import _status_html, images_view, report_view

POLL_S = 0.5  # how often a running job's view is refreshed
CURVE_EVERY_S = 3.0  # how often a follower sends the loss curve image (redrawn only when it changed)


def parse_subject_lines(text: str) -> list[dict]:
    """The page's more-subjects box: one subject per line, 'folder | instance prompt | class prompt'."""
    subjects = []
    for n, line in enumerate(str(text or "").splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 3 or not all(parts):
            raise InputError(
                f"More subjects, line {n}: write 'folder | instance prompt | class prompt', e.g. "
                "'/photos/rex | a photo of zwx dog | a photo of dog'."
            )
        subjects.append({"images": [parts[0]], "instance_prompt": parts[1], "class_prompt": parts[2]})
    return subjects


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
        from ..data import MIN_SIDE, center_square, find_images, open_image

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
        from ..attack import AttackConfig

        start = self.initial_values()
        prompts = attack_prompts(start["instance_prompt"], start["class_prompt"])
        return {**AttackConfig().to_dict(), **prompts, **self.host.attack}

    def initial_evaluation(self) -> dict[str, Any]:
        from ..evaluate.config import EvalConfig

        return {**EvalConfig().to_dict(), **self.host.evaluation}

    def model_and_images(self, model, files, folder, no_model: str, no_images: str) -> tuple[str, list[str]]:
        """The chosen model's path and the photos' paths, or InputError (``no_model`` / ``no_images``);
        a missing folder or a non-image file fails here, before any loading."""
        from ..data import find_images

        model_path = self.host.resolve_model(model)
        if not model_path:
            raise InputError(no_model)
        images = self.image_sources(files, folder)
        if not images:
            raise InputError(no_images)
        find_images(images)
        return model_path, images

    def make_config(
        self, model: str, files: Any, folder: str, instance_prompt: str, class_prompt: str, advanced: dict,
        more_subjects: str = "", original: str = "",
    ) -> ProtectConfig:  # fmt: skip
        """A validated ProtectConfig from the page's inputs (Advanced values by field name; more subjects as
        lines 'folder | instance prompt | class prompt'; ``original``: the model a protected one came from)."""
        values = {
            name: parse_field(ProtectConfig, name, advanced.get(name, _default(name)))
            for name in ADVANCED_FIELDS
        }
        model_path, images = self.model_and_images(
            model,
            files,
            folder,
            "Choose the model to protect (a checkpoint file or a diffusers folder).",
            "Add the subject's photos: upload 4-6 images or give a folder of them.",
        )
        reference = ""
        if original:
            reference = self.host.resolve_model(original)
            if not reference:
                raise InputError(
                    f"Original model {original!r} not found: choose it from the list (or leave it empty)."
                )
        return ProtectConfig(
            model=model_path,
            reference_model=reference,
            images=images,
            instance_prompt=str(instance_prompt or ""),
            class_prompt=str(class_prompt or ""),
            subjects=parse_subject_lines(more_subjects),
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
        self, model, files, folder, instance_prompt, class_prompt, advanced: dict, more_subjects: str = "",
        original: str = "",
    ) -> str | None:  # fmt: skip
        """Start protecting; returns a refusal message when a job is already running."""
        config = self.make_config(
            model, files, folder, instance_prompt, class_prompt, advanced, more_subjects, original
        )

        def work(progress, should_stop):
            from ..protection import protect

            result = protect(config, progress=progress, should_stop=should_stop, resume=True)
            if not self.host.keep_on_device:
                result.model.to("cpu")
            if not result.cancelled:
                self.protected = result
            return result

        return self._start("protection", work)

    def start_protect_images(
        self, model, files, folder, instance_prompt, class_prompt, method, budget, steps
    ) -> str | None:
        """Protect the photos themselves (ASPL/LDU) into a new folder under the output folder."""
        from ..images import ImageProtectConfig

        model_path, images = self.model_and_images(
            model,
            files,
            folder,
            "Choose the surrogate model (the model an attacker would likely fine-tune).",
            "Add the photos to protect: upload them or give a folder of them.",
        )
        stem = Path(model_path).stem or "model"
        out = self.host.output_path(f"protected-photos/{stem}-{method}-{time.strftime('%Y%m%d-%H%M%S')}")
        config = ImageProtectConfig(
            model=model_path,
            images=images,
            output=str(out),
            method=str(method),
            budget=int(budget) / 255,
            steps=int(steps),
            instance_prompt=str(instance_prompt or ""),
            class_prompt=str(class_prompt or ""),
        )

        def work(progress, should_stop):
            from ..images import protect_images

            return protect_images(config, progress=progress, should_stop=should_stop, resume=True)

        return self._start("image protection", work)

    def protect_images_events(
        self, model, files, folder, instance_prompt, class_prompt, method, budget, steps
    ) -> Iterator[View]:
        """Protect photos button: start the image protection, then stream views."""
        try:
            refused = self.start_protect_images(
                model, files, folder, instance_prompt, class_prompt, method, budget, steps
            )
        except APDMError as exc:
            yield View(_status_html(str(exc), kind="error"), done=True)
            return
        yield from self.follow(refused)

    def make_test_configs(self, kind: str, attack_values: dict, eval_values: dict):
        """(AttackConfig, EvalConfig) from the page: the attack works on the protection's images."""
        from ..attack import AttackConfig
        from ..evaluate.config import EvalConfig

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
            from ..evaluate.report import compare
            from ..loading import load_model
            from ..models import resolve_device

            source = protected.config
            base = load_model(
                source.model, device=resolve_device(attack.device), model_type=source.model_type
            )
            try:
                result = compare(
                    base,
                    protected.model,
                    protected.config.images,
                    attack,
                    evaluation,
                    out_dir=out,
                    protection_history=protected.history,
                    progress=progress,
                    should_stop=should_stop,
                )
            finally:
                if not self.host.keep_on_device:
                    protected.model.to("cpu")
            if result.cancelled and result.work_dir is not None:  # a new test starts over: keep nothing
                remove_work_dir(result.work_dir)
            return result

        from ..evaluate.report import ARM_LABELS, ARMS

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
        if job.kind == "image protection":
            if result.cancelled:
                msg = (
                    f"Stopped after {result.steps_done}/{result.config.steps} iterations; the state is saved: "
                    "press Protect photos with the same settings to continue."
                )
                return View(_status_html(msg, job.event), curve=curve, done=True)
            msg = f"{len(result.images)} protected photos written to {result.output}."
            return View(
                _status_html(msg, job.event, "ok"), curve=curve, report=images_view(result), done=True
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

    def protect_events(self, model, files, folder, instance_prompt, class_prompt, *values) -> Iterator[View]:
        """Protect button: start (or politely refuse and show the running job), then stream views.
        ``values``: the Advanced fields in order, then (optionally) the more-subjects lines and the original
        model."""
        advanced, more = values[: len(ADVANCED_FIELDS)], values[len(ADVANCED_FIELDS) :]
        try:
            refused = self.start_protect(
                model, files, folder, instance_prompt, class_prompt, dict(zip(ADVANCED_FIELDS, advanced)),
                *(str(v or "") for v in more[:2]),
            )  # fmt: skip
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
        from ..protection import write_output

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
