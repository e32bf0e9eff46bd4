"""install.py (run by A1111/Forge and ComfyUI-Manager): installs only what is absent, never torch."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_installer():
    spec = importlib.util.spec_from_file_location("apdm_install_under_test", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: nothing runs on import
    return module


def test_installs_only_absent_packages_with_every_host_package_pinned():
    installer = load_installer()
    installed = {"torch": "2.1.2+cu121", "xformers": "0.0.23", "transformers": "4.30.2", "numpy": "1.26.2"}
    calls = []

    def run_pip(args):
        constraints = Path(args[args.index("-c") + 1]).read_text()
        calls.append((args[: args.index("-c")], constraints))
        for req in args[1 : args.index("-c")]:
            installed[installer._name(req)] = "9.9"

    reqs = ["torch>=2.0", "torchvision", "xformers", "diffusers>=0.30", "peft", "transformers>=4.38", "numpy"]
    assert installer.main(reqs, installed.get, run_pip, packages=dict(installed)) == [
        "diffusers>=0.30",
        "peft",
    ]
    assert calls == [
        (
            ["install", "diffusers>=0.30", "peft"],
            "numpy==1.26.2\ntorch==2.1.2+cu121\ntransformers==4.30.2\nxformers==0.0.23\n"
            "diffusers<=0.31.0\npeft<=0.13.2\n",  # what works beside A1111's transformers 4.30.2
        )
    ]
    # the second start finds everything and calls pip no more
    assert installer.main(reqs, installed.get, run_pip, packages=dict(installed)) == [] and len(calls) == 1


def test_a_failed_install_is_reported_not_raised(capsys):
    installer = load_installer()

    def run_pip(args):
        raise RuntimeError("ResolutionImpossible")

    assert installer.main(["nonexistent-pkg>=1"], lambda name: None, run_pip, packages={}) == []
    assert "could not install nonexistent-pkg>=1" in capsys.readouterr().out


def test_older_host_versions_are_kept_and_reported(capsys):
    installer = load_installer()
    missing, old = installer.plan(
        ["transformers>=4.38", "gradio>=3.41.2"], {"transformers": "4.30.2", "gradio": "3.41.2"}.get
    )
    assert missing == [] and old == ["transformers 4.30.2 (APDM asks transformers>=4.38)"]


def test_runs_as_a_plain_script_without_launch_when_nothing_is_missing():
    """ComfyUI-Manager runs `python install.py` (no `launch` module); with the test venv complete,
    it must do nothing and exit 0."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "install.py")], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "Successfully installed" not in proc.stdout
