"""Fake modules.script_callbacks: records the registered ui_tabs and ui_settings callbacks."""

ui_tabs_callbacks = []
ui_settings_callbacks = []


def on_ui_tabs(callback, *, name=None):
    ui_tabs_callbacks.append(callback)


def on_ui_settings(callback, *, name=None):
    ui_settings_callbacks.append(callback)
