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
    ]
    assert not missing, f"README options table lacks {missing}"


def test_ci_commands_are_at_the_top():
    assert README.index("<!-- ci:install -->") < README.index("<!-- ci:test -->") < 1200
