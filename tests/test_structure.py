"""The house rules the code keeps (README "Layout"): no engine file over 500 lines, no function over
80 lines outside the benchmarks and tests; each method and attack owns its settings."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = [ROOT / "apdm_core", ROOT / "nodes", ROOT / "scripts"]


def python_files():
    return [f for folder in CODE for f in sorted(folder.rglob("*.py"))]


def test_no_engine_file_over_500_lines():
    long = {str(f.relative_to(ROOT)): n for f in python_files() if (n := f.read_text().count("\n")) > 500}
    assert not long, long


def test_no_function_over_80_lines():
    long = []
    for f in python_files():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_every_method_and_attack_owns_its_settings():
    from dataclasses import fields

    from apdm_core.attack.config import ATTACK_SETTINGS, AttackConfig
    from apdm_core.config import ProtectConfig, RunSettings
    from apdm_core.methods import METHODS, settings_fields
    from apdm_core.registry import load

    run = {f.name for f in fields(RunSettings)}
    for name in METHODS:
        own = settings_fields(name)
        assert own and not own & run, name  # declared once, in the method's folder
        assert own <= {f.name for f in fields(ProtectConfig)}  # and a flat key of the config
    for name, spec in ATTACK_SETTINGS.items():
        own = {f.name for f in fields(load(spec))}
        assert own <= {f.name for f in fields(AttackConfig)}, name
