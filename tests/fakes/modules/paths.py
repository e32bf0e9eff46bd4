"""Fake modules.paths: the webui's data folder (the test points it at a temporary folder)."""

data_path = ""
