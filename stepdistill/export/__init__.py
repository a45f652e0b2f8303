"""Exports: safetensors with the recipe in its metadata; diffusers folders with a few-step scheduler; LoRA; one
original-layout checkpoint file for A1111 / Forge / ComfyUI."""
from .diffusers_folder import export_diffusers  # noqa: F401
from .lora import export_lora  # noqa: F401
from .single_file import export_single_file  # noqa: F401
from .weights import export_safetensors  # noqa: F401
