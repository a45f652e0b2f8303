"""A randomly initialised text-conditional UNet at a real model's size, for speed and memory checks only.

`size: sd15` is Stable Diffusion 1.5's UNet2DConditionModel (860M parameters, 4x64x64 latents, CLIP-L 768-d text),
`sdxl` SDXL's (2.6B, 4x128x128, 2048-d text plus the pooled-text and size/crop "text_time" embedding), `tiny` and
`tiny-xl` the same layouts at test size. Built from config: no download, no weights, no data, nothing to evaluate
(its samples are noise). Used by `stepdistill bench --speed` recipes and scripts/gpu_check.py.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch

from ..diffusion.schedules import VPDiscrete
from ..errors import RecipeError
from ..models.score import ScoreModel
from ..registry import register
from .base import Teacher

TINY = dict(sample_size=8, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4)
SIZES = {
    "sd15": dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8),
    "sdxl": dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
    "tiny": TINY,
    "tiny-xl": {**TINY, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 16 + 6 * 8},
}
TOKENS = 77  # CLIP's context length


@dataclass
class SyntheticConfig:
    name: str = "synthetic-unet"
    size: Literal["tiny", "tiny-xl", "sd15", "sdxl"] = "tiny"
    seed: int = 0  # initialisation of the random weights


def scaled_linear_vp(steps: int = 1000) -> VPDiscrete:
    """Stable Diffusion's schedule: betas linear in sqrt from 0.00085 to 0.012 over 1000 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    return VPDiscrete(torch.cumprod(1 - betas, 0))


@register("teacher", "synthetic-unet")
class SyntheticTeacher(Teacher):
    """Random weights at a real model's size; conditions are random (77, text_dim) embeddings."""

    Config = SyntheticConfig

    def __init__(self, cfg: SyntheticConfig) -> None:
        from diffusers import UNet2DConditionModel

        with torch.random.fork_rng(devices=[]):  # building must not shift the run's random stream
            torch.manual_seed(cfg.seed)
            unet = UNet2DConditionModel(in_channels=4, out_channels=4, **SIZES[cfg.size])
        c = unet.config
        xl = c.addition_embed_type == "text_time"
        # SDXL: one more row, the pooled text embedding (models/conditioning.py), and fixed size/crop ids (full size,
        # no crop; the VAE downsamples by 8)
        self.tokens, self.text_dim = TOKENS + xl, c.cross_attention_dim
        time_ids = torch.tensor([8.0 * c.sample_size] * 2 + [0.0, 0.0] + [8.0 * c.sample_size] * 2) if xl else None
        null = torch.zeros(self.tokens, self.text_dim)
        self.score = ScoreModel(unet, scaled_linear_vp(), "eps", "text", null_cond=null, time_ids=time_ids)
        self.score.requires_grad_(False).eval()
        self.shape = (4, unet.config.sample_size, unet.config.sample_size)

    def sample_cond(self, n: int, generator: torch.Generator | None = None,
                    classes: list[int] | None = None) -> torch.Tensor:
        """(n, 77, text_dim) random text embeddings (unit scale, like CLIP's normalised outputs); SDXL sizes add the
        pooled row."""
        return torch.randn(n, self.tokens, self.text_dim, generator=generator,
                           device=generator.device if generator is not None else None)

    def eval_cond(self, n: int, classes: list[int] | None = None) -> torch.Tensor:
        return self.sample_cond(n, torch.Generator().manual_seed(0)).to(self.score.null_cond.device)

    def student_network(self, width: float = 1.0) -> ScoreModel:
        if width != 1.0:
            raise RecipeError("generator.width < 1 is not supported for synthetic-unet teachers")
        return copy.deepcopy(self.score).requires_grad_(True).train()
