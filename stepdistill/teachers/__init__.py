"""Built-in teachers, registered by name: gmm (analytic), fashion-mnist (bundled), diffusers (any pixel UNet folder),
sd (Stable Diffusion pipeline folders: latent, text-to-image), synthetic (random weights at SD1.5, SDXL, SD3-medium,
FLUX-dev and SANA-1.6B size, and tiny; for plans and speed checks). registry.py finds every module here.
"""
from .base import Teacher


def build_teacher(cfg) -> Teacher:
    from ..registry import get

    return get("teacher", cfg.name)(cfg)
