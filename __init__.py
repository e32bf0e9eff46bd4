"""ComfyUI entry point of the APDM package (this folder goes into ComfyUI/custom_nodes/).

Imports cleanly without ComfyUI (the tests import it): the nodes only touch ComfyUI's
modules when they run. The engine, ``apdm_core``, lives next to this file: it is imported
from here (so the package works without a pip install) and sys.path is left as it was found,
so that this folder's other top-level names (``nodes``, ``scripts``, ``tests``) never shadow
ComfyUI's own modules.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ADDED = _HERE not in sys.path
if _ADDED:
    sys.path.insert(0, _HERE)
try:
    import apdm_core  # noqa: F401  (kept in sys.modules: the nodes' lazy engine imports find it there)
finally:
    if _ADDED:
        sys.path.remove(_HERE)

if __package__:  # loaded by ComfyUI as custom_nodes.<folder>
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
else:  # imported as a plain module (pytest collecting the repository root): nothing to register
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"  # web/js/*.js: the live loss curve on the Protect node

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
