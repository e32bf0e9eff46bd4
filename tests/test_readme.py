"""The README stays current: every option documented, the CI commands present."""

from dataclasses import fields
from pathlib import Path

from apdm_core.config import ProtectConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_every_option_is_documented():
    missing = [
        f.name
        for f in fields(ProtectConfig)
        if f"| `{f.name}` | `--{f.name.replace('_', '-')}` |" not in README
        and f"| `{f.name}` | `--{f.name.rstrip('s').replace('_', '-')}` |"
        not in README  # subjects: --subject
    ]
    assert not missing, f"README options table lacks {missing}"


def test_ci_commands_are_at_the_top():
    assert README.index("<!-- ci:install -->") < README.index("<!-- ci:test -->") < 1200


def python_blocks() -> list[str]:
    blocks, inside = [], None
    for line in README.splitlines():
        if line.strip() == "```python":
            inside = []
        elif line.strip() == "```" and inside is not None:
            blocks.append("\n".join(inside))
            inside = None
        elif inside is not None:
            inside.append(line)
    return blocks


# what makes the README's examples quick here: the paper's step counts and sample sizes, capped
CAPS = {"outer_steps": 2, "inner_steps": 2, "num_class_images": 2, "sample_steps": 2, "steps": 2,
        "num_samples": 2, "eval_steps": 2, "sample_batch_size": 4, "eval_batch_size": 2}  # fmt: skip


def test_every_python_block_runs_as_written(tmp_path, monkeypatch):
    """The README's Python examples run, in order and in one namespace, on the demo world model (as
    sd15/), its subject photos (photos/) and a tiny SD1 single file (sd15.safetensors), offline. Only
    the step counts and sample sizes are capped (CAPS), by wrapping the config classes."""
    import dataclasses
    import shutil

    from ldm_layout import make_checkpoint, write_config_folder

    from apdm_core import detection
    from apdm_core.attack import AttackConfig
    from apdm_core.evaluate import EvalConfig
    from apdm_core.images import ImageProtectConfig
    from apdm_core.world import WORLD_MODEL_DIR, render

    shutil.copytree(WORLD_MODEL_DIR, tmp_path / "sd15")
    (tmp_path / "photos").mkdir()
    for i, im in enumerate(render.photos(render.make_subject(8), 4, size=64)):  # 64 px: the tiny SD1 too
        im.save(tmp_path / "photos" / f"ball_{i}.png")
    make_checkpoint(tmp_path / "sd15.safetensors", "sd1")  # tiny, SD1's layout: its own config folder
    tiny_sd1 = write_config_folder(tmp_path / "tiny_sd1_config", "sd1")
    monkeypatch.setattr(detection, "config_dir", lambda model_type: tiny_sd1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APDM_CACHE_DIR", str(tmp_path / "cache"))
    for cls in (ProtectConfig, AttackConfig, EvalConfig, ImageProtectConfig):
        real = cls.__post_init__
        names = {f.name for f in dataclasses.fields(cls)}

        def capped(self, real=real, names=names):
            for key, cap in CAPS.items():
                if key in names and getattr(self, key) is not None and getattr(self, key) > cap:
                    setattr(self, key, cap)
            real(self)

        monkeypatch.setattr(cls, "__post_init__", capped)
    blocks = python_blocks()
    assert len(blocks) >= 3
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own examples
    assert (tmp_path / "protected").is_dir() and (tmp_path / "protected.safetensors").is_file()
    assert (tmp_path / "report" / "report.json").is_file()
    assert len(list((tmp_path / "photos-protected").glob("*.png"))) == 4
