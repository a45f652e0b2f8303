"""A randomly initialised text-conditional denoiser at a real model's size, for speed and memory checks only.

UNet2DConditionModel sizes: `sd15` is Stable Diffusion 1.5's (860M parameters, 4x64x64 latents, CLIP-L 768-d text),
`sdxl` SDXL's (2.6B, 4x128x128, 2048-d text plus the pooled-text and size/crop "text_time" embedding), `tiny` and
`tiny-xl` the same layouts at test size. Flow transformers at 1024 px (RectifiedFlow, flow prediction, as teacher
`sd` loads them): `sd3-medium` (SD3Transformer2DModel, 2.0B, 16x128x128, 77 CLIP + 256 T5 tokens of 4096 and the
pooled row), `flux-dev` (FluxTransformer2DModel, 11.9B, 16x128x128 in 2x2 patches, 512 T5 tokens and the pooled CLIP
row, embedded guidance 3.5), `sana-1600m` (SanaTransformer2DModel, 1.6B, 32x32x32, 300 Gemma tokens of 2304 and the
attention mask as last column); `tiny-sd3`, `tiny-flux`, `tiny-sana` the same layouts at test size. Conditions are
packed as models/conditioning.py packs real ones. Built from config: no download, no weights, no data (its `real_data`
is unit normals in the latent shape, so objectives that need data can be timed and planned), nothing to evaluate (its
samples are noise). Used by `stepdistill bench --speed` recipes, `stepdistill plan` configs and scripts/gpu_check.py.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from ..diffusion.schedules import RectifiedFlow, VPDiscrete
from ..errors import RecipeError
from ..models.score import ScoreModel
from ..registry import register
from .base import Teacher

TINY = dict(sample_size=8, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4)
SIZES = {  # UNet2DConditionModel configs
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


class Transformer(NamedTuple):
    """A flow transformer size: its diffusers class, config, text tokens (pooled row and mask column not counted) and
    latent side at the model's native resolution."""
    cls: str
    config: dict
    tokens: int
    side: int


TRANSFORMERS = {  # the published transformer/config.json of each model, defaults left out
    "sd3-medium": Transformer("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192), TOKENS + 256, 128),  # 2 CLIPs side by side, then T5 (StableDiffusion3Pipeline: 256)
    "flux-dev": Transformer("FluxTransformer2DModel", dict(
        in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True), 512, 128),
    "sana-1600m": Transformer("SanaTransformer2DModel", dict(  # Sana_1600M_1024px_diffusers
        in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
        num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
        sample_size=32), 300, 32),
    "tiny-sd3": Transformer("SD3Transformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=8), 12, 8),
    "tiny-flux": Transformer("FluxTransformer2DModel", dict(
        in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)), 12, 8),
    "tiny-sana": Transformer("SanaTransformer2DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        sample_size=8), 12, 8),
}
FLUX_GUIDANCE = 3.5  # FLUX-dev's embedded guidance scale (FluxPipeline's default; teacher sd's embedded_guidance)


@dataclass
class SyntheticConfig:
    name: str = "synthetic-unet"
    # UNets (sd15, sdxl) or flow transformers (sd3-medium, flux-dev, sana-1600m) at their real size; tiny-*: the same
    # layouts at test size (teachers/synthetic.py)
    size: Literal["tiny", "tiny-xl", "sd15", "sdxl", "tiny-sd3", "tiny-flux", "tiny-sana", "sd3-medium", "flux-dev",
                  "sana-1600m"] = "tiny"
    seed: int = 0  # initialisation of the random weights


def scaled_linear_vp(steps: int = 1000) -> VPDiscrete:
    """Stable Diffusion's schedule: betas linear in sqrt from 0.00085 to 0.012 over 1000 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    return VPDiscrete(torch.cumprod(1 - betas, 0))


@register("teacher", "synthetic")
@register("teacher", "synthetic-unet")  # the name from before the transformer sizes
class SyntheticTeacher(Teacher):
    """Random weights at a real model's size; conditions are random text embeddings in the family's packing."""

    Config = SyntheticConfig

    def __init__(self, cfg: SyntheticConfig) -> None:
        import diffusers

        spec = TRANSFORMERS.get(cfg.size)
        with torch.random.fork_rng(devices=[]):  # building must not shift the run's random stream
            torch.manual_seed(cfg.seed)
            net = (diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **SIZES[cfg.size]) if spec is None
                   else getattr(diffusers, spec.cls)(**spec.config))
        c = net.config
        self.mask = spec is not None and spec.cls == "SanaTransformer2DModel"
        if spec is None:
            xl = c.addition_embed_type == "text_time"
            # SDXL: one more row, the pooled text embedding (models/conditioning.py), and fixed size/crop ids (full
            # size, no crop; the VAE downsamples by 8)
            self.tokens, self.text_dim = TOKENS + xl, c.cross_attention_dim
            time_ids = torch.tensor([8.0 * c.sample_size] * 2 + [0.0, 0.0] + [8.0 * c.sample_size] * 2) if xl else None
            null = torch.zeros(self.tokens, self.text_dim)
            self.score = ScoreModel(net, scaled_linear_vp(), "eps", "text", null_cond=null, time_ids=time_ids)
            self.shape = (4, c.sample_size, c.sample_size)
        else:
            # SD3 / FLUX: the pooled row after the tokens; SANA: the attention mask as one more column
            self.tokens = spec.tokens + (not self.mask)
            self.text_dim = c.caption_channels + 1 if self.mask else c.joint_attention_dim
            null = torch.zeros(self.tokens, self.text_dim)
            if self.mask:
                null[:, -1] = 1.0
            guidance = FLUX_GUIDANCE if getattr(c, "guidance_embeds", False) and spec.cls.startswith("Flux") else None
            self.score = ScoreModel(net, RectifiedFlow(), "flow", "text", null_cond=null, guidance_input=guidance)
            channels = c.in_channels // 4 if spec.cls.startswith("Flux") else c.in_channels  # FLUX: 2x2 patches
            self.shape = (channels, spec.side, spec.side)
        self.score.requires_grad_(False).eval()

    def sample_cond(self, n: int, generator: torch.Generator | None = None,
                    classes: list[int] | None = None) -> torch.Tensor:
        """(n, tokens, text_dim) random text embeddings (unit scale, like CLIP's normalised outputs); SDXL, SD3 and
        FLUX sizes add the pooled row, SANA sizes an all-ones attention mask column."""
        cond = torch.randn(n, self.tokens, self.text_dim, generator=generator,
                           device=generator.device if generator is not None else None)
        if self.mask:
            cond[..., -1] = 1.0
        return cond

    def eval_cond(self, n: int, classes: list[int] | None = None) -> torch.Tensor:
        return self.sample_cond(n, torch.Generator().manual_seed(0)).to(self.score.null_cond.device)

    def real_data(self):
        """Unit normals in the latent shape (the global random stream): stands in for data as the weights do."""
        from ..data.real import FunctionData

        return FunctionData(lambda n, cond=None: torch.randn(n, *self.shape))

    def student_network(self, width: float = 1.0) -> ScoreModel:
        if width != 1.0:
            raise RecipeError("generator.width < 1 is not supported for synthetic teachers")
        return copy.deepcopy(self.score).requires_grad_(True).train()
