"""Fake of ComfyUI's ``comfy`` package for the node tests (see tests/fakes/comfyui/README.md)."""
