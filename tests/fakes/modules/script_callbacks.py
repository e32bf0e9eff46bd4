"""Fake modules.script_callbacks: records the registered ui_tabs callbacks."""

ui_tabs_callbacks = []


def on_ui_tabs(callback, *, name=None):
    ui_tabs_callbacks.append(callback)
