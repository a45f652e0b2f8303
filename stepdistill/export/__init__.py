"""Exports: safetensors with the recipe in its metadata; diffusers folders with a few-step scheduler."""
from .diffusers_folder import export_diffusers  # noqa: F401
from .weights import export_safetensors  # noqa: F401
