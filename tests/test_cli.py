import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apdm_core.cli import main
from apdm_core.config import ProtectConfig

ROOT = Path(__file__).resolve().parents[1]


def test_config_command_round_trips_into_protect(tmp_path, capsys, fast_config):
    assert main(["config", "--preset", "reference"]) == 0
    (tmp_path / "cfg.yaml").write_text(capsys.readouterr().out)
    assert ProtectConfig.load(tmp_path / "cfg.yaml") == ProtectConfig.from_preset("reference")
    base = fast_config()
    base.save(tmp_path / "fast.json")
    out = tmp_path / "protected"
    argv = ["protect", "--config", str(tmp_path / "fast.json"), "--outer-steps", "2", "--out", str(out),
            "--save-config", str(tmp_path / "used.yaml")]  # fmt: skip
    assert main(argv) == 0
    assert (out / "unet").is_dir()
    used = ProtectConfig.load(tmp_path / "used.yaml")
    assert used.outer_steps == 2 and used.output == str(out) and used.lr_protect == base.lr_protect
    assert "protected model written to" in capsys.readouterr().out


def test_errors_are_one_clear_line(tmp_path, capsys, fast_config):
    assert (
        main(
            [
                "protect",
                "--model",
                str(tmp_path / "nope"),
                "--images",
                str(tmp_path / "photos"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("apdm: error:") and "nope does not exist" in err
    assert main(["protect", "--images", "x", "--out", "y"]) == 2
    assert "--model is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["protect", "--loss", "l2"])


def test_comfyui_entry_point_imports_without_comfyui():
    spec = importlib.util.spec_from_file_location(
        "apdm_comfy_pkg", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    before = set(sys.modules)  # (a checkout folder named "comfy" is itself in sys.modules under pytest)
    try:
        spec.loader.exec_module(module)
        assert isinstance(module.NODE_CLASS_MAPPINGS, dict) and module.NODE_CLASS_MAPPINGS
        host = [
            m for m in set(sys.modules) - before if m.split(".")[0] in ("comfy", "folder_paths", "server")
        ]
        assert not host, f"importing the entry point imported ComfyUI modules: {host}"
    finally:
        sys.modules.pop(spec.name, None)


def test_engine_imports_no_host_module():
    import subprocess

    code = "import apdm_core.protection, apdm_core.cli, sys; bad=[m for m in ('comfy','folder_paths','modules','gradio') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_no_torchvision_fallback_notice_from_the_engine():
    """Building a pipeline makes transformers warn that its image processors fall back to PIL when
    torchvision is missing (there is none for the pinned CPU torch): apdm_core drops exactly that notice."""
    code = (
        "import apdm_core, logging\n"
        "from diffusers import StableDiffusionPipeline\n"
        "log = logging.getLogger('transformers.utils.import_utils')\n"
        "log.warning('`XImageProcessor` requires torchvision (not installed); falling back to `XPil` ...')\n"
        "log.warning('another transformers warning')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "requires torchvision" not in out.stderr and "another transformers warning" in out.stderr
