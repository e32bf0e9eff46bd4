"""Installer run by A1111/Forge (``launch`` importable) or ComfyUI-Manager (plain python).

Installs the requirements that are absent and nothing else:
- never torch, torchvision, torchaudio or xformers (the host owns them);
- every package the host already has is pinned at its installed version (a constraints file), so
  pip only adds packages: a dependency can never upgrade the host's transformers, pydantic or
  torch (A1111 1.10 pins transformers 4.30.2 and pydantic 1.x; their latest versions break it).
  pip picks the newest version of a missing package that fits; when none does, this says so;
- a package the host has in an older version than requirements.txt names is kept (the host pins
  it for its own code, and A1111 reinstalls its pins at every start) and reported on one line;
  the missing packages are then capped at versions known to work beside it (OLD_HOST_CAPS);
- nothing to do -> no pip call and no output, so every start after the first is a no-op.
"""

import os
import subprocess
import sys
import tempfile

try:
    import launch  # A1111 / Forge
except ImportError:  # ComfyUI-Manager runs this file with the host's python
    launch = None

HERE = os.path.dirname(os.path.abspath(__file__))
NEVER = ("torch", "torchvision", "torchaudio", "xformers")
# (package the host holds back, first version we want, what to cap, the cap): A1111 1.10 pins
# transformers 4.30.2 and accelerate 0.21.0; diffusers >= 0.32 imports transformers classes 4.30
# lacks, and peft >= 0.14 imports transformers/accelerate helpers those versions lack (peft
# declares accelerate>=0.21 regardless). Found by importing each in that webui's own venv; the
# engine protects and saves with diffusers 0.31.0 + transformers 4.30.2 + gradio 3.41.2.
OLD_HOST_CAPS = (
    ("transformers", "4.38", "diffusers", "<=0.31.0"),
    ("transformers", "4.38", "peft", "<=0.13.2"),
    ("accelerate", "0.30", "peft", "<=0.13.2"),
)


def requirements(path=os.path.join(HERE, "requirements.txt")):
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                yield line


def _name(req):
    for sep in "<>=!~[; ":
        req = req.split(sep, 1)[0]
    return req.strip()


def installed_version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def too_old(req, version):
    """True when ``version`` does not satisfy ``req`` (False when that cannot be told)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return False
    try:
        return not Requirement(req).specifier.contains(version, prereleases=True)
    except Exception:
        return False


def plan(reqs, version_of=installed_version):
    """(to install, kept older versions) for the given requirement lines."""
    missing, old = [], []
    for req in reqs:
        name = _name(req)
        if name.lower() in NEVER:
            continue
        version = version_of(name)
        if version is None:
            missing.append(req)
        elif too_old(req, version):
            old.append(f"{name} {version} (APDM asks {req})")
    return missing, old


def installed_packages():
    """{name: version} of every distribution in this python."""
    from importlib import metadata

    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and dist.version:
            found.setdefault(name, dist.version)
    return found


def caps(version_of=installed_version):
    """Upper bounds for missing packages that make them work beside the host's older ones."""
    lines = []
    for held, wanted, name, cap in OLD_HOST_CAPS:
        version = version_of(held)
        if version is not None and too_old(f"{held}>={wanted}", version):
            lines.append(f"{name}{cap}")
    return lines


def pin_host_packages(folder, packages, extra=()):
    """A pip constraints file holding every installed package at its installed version (+ extra lines)."""
    path = os.path.join(folder, "host-constraints.txt")
    with open(path, "w", encoding="utf-8") as f:
        for name, version in sorted(packages.items()):
            f.write(f"{name}=={version}\n")
        for line in extra:
            f.write(line + "\n")
    return path


def main(reqs=None, version_of=installed_version, run_pip=None, packages=None):
    missing, old = plan(list(reqs if reqs is not None else requirements()), version_of)
    if not missing:
        return []
    if old:
        print("APDM: keeping the host's " + "; ".join(old) + "; installing versions that work with them.")
    with tempfile.TemporaryDirectory() as tmp:
        constraints = pin_host_packages(
            tmp, installed_packages() if packages is None else packages, caps(version_of)
        )
        args = ["install", *missing, "-c", constraints]
        try:
            if run_pip is not None:
                run_pip(args)
            elif launch is not None and hasattr(launch, "run_pip"):
                launch.run_pip(" ".join(f'"{a}"' for a in args), "APDM requirements: " + ", ".join(missing))
            else:
                subprocess.check_call([sys.executable, "-m", "pip", *args])
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            print(
                f"APDM: could not install {', '.join(missing)} without changing packages this app already "
                f"has ({exc}). Install them by hand, e.g. `python -m pip install {' '.join(missing)}`, "
                "and check that the app still starts."
            )
            return []
    return missing


if __name__ == "__main__":
    main()
