"""ComfyUI nodes: thin adapters that collect inputs, call one apdm_core function, wrap the result.

The node classes arrive with the ComfyUI-nodes issue; the mappings exist now so the package
loads in ComfyUI and in the tests.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
