"""Fake comfy.utils: ProgressBar with the global hook (as in ComfyUI), unet_to_diffusers."""

PROGRESS_BAR_HOOK = None


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK
        self.node_id = node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        if value > self.total:
            value = self.total
        self.current = value
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)


def unet_to_diffusers(unet_config):
    """The fake MODEL (comfy.model_patcher.FakeUNetModel) keeps diffusers key names: identity map."""
    return {k: k for k in unet_config.get("diffusers_keys", [])}
