"""ComfyUI entry point of the APDM package (this folder goes into ComfyUI/custom_nodes/).

Imports cleanly without ComfyUI (the tests import it): the nodes only touch ComfyUI's
modules when they run. The engine, ``apdm_core``, lives next to this file; it is put on
sys.path here so the package works without a pip install.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

if __package__:  # loaded by ComfyUI as custom_nodes.<folder>
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
else:  # imported as a plain module (pytest collecting the repository root): nothing to register
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"  # web/js/*.js: the live loss curve on the Protect node

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
