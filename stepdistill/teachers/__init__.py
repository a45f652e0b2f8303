"""Built-in teachers, registered by name: gmm (analytic), fashion-mnist (bundled), diffusers (any pixel UNet folder),
sd (Stable Diffusion pipeline folders: latent, text-to-image), synthetic-unet (random weights at SD1.5/SDXL size, for
speed checks). registry.py finds every module here.
"""
from .base import Teacher


def build_teacher(cfg) -> Teacher:
    from ..registry import get

    return get("teacher", cfg.name)(cfg)
