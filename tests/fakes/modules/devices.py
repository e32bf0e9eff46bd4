"""Fake modules.devices: pretend the webui runs on a GPU so its model gets moved off it."""


class _Device:
    type = "cuda"


device = _Device()
cpu = "cpu"
