"""Installer run by A1111/Forge (``launch`` importable) or ComfyUI-Manager (plain python).

Installs only the requirements that are missing, never torch/torchvision/xformers, and is a
no-op when everything is present. Host-specific behaviour arrives with the A1111 issue.
"""

import os
import subprocess
import sys

try:
    import launch  # A1111 / Forge
except ImportError:  # ComfyUI-Manager runs this file with the host's python
    launch = None

HERE = os.path.dirname(os.path.abspath(__file__))
NEVER = {"torch", "torchvision", "torchaudio", "xformers"}


def requirements():
    with open(os.path.join(HERE, "requirements.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                yield line


def _name(req):
    for sep in "<>=!~[; ":
        req = req.split(sep, 1)[0]
    return req.strip()


def is_installed(name):
    from importlib import metadata

    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def main():
    missing = [r for r in requirements() if _name(r).lower() not in NEVER and not is_installed(_name(r))]
    for req in missing:
        if launch is not None:
            launch.run_pip(f'install "{req}"', f"APDM requirement: {req}")
        else:
            subprocess.check_call([sys.executable, "-m", "pip", "install", req])


main()
