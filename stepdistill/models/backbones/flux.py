"""diffusers FluxTransformer2DModel: FLUX.1 schnell and dev (dev embeds its guidance scale)."""
from __future__ import annotations

import torch
from torch import nn

from ...registry import register
from ..conditioning import unpack_pooled
from . import TransformerBackbone


@register("backbone", "flux")
class FluxBackbone(TransformerBackbone):
    name = "FluxTransformer2DModel"
    image_output = 1  # both kinds of block return (text tokens, image tokens)

    @staticmethod
    def claims(net: nn.Module) -> bool:
        from diffusers import FluxTransformer2DModel

        return isinstance(net, FluxTransformer2DModel)

    def call(self, score, net, x, timestep, cond):
        """2x2 patches of the latent as tokens with their (0, row, column) ids, time in [0, 1], the pooled CLIP row,
        and the embedded guidance for guidance-distilled (dev) networks."""
        n, c, h, w = x.shape
        tokens = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, c * 4)
        ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
        ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        text, pooled = unpack_pooled(cond.to(x.dtype), net.config.pooled_projection_dim)
        guidance = score.guidance_vector(n, x.device) if net.config.guidance_embeds else None  # FLUX-dev
        out = net(tokens, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep / 1000,
                  img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text.shape[1], 3, device=x.device),
                  guidance=guidance).sample
        return out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)

    def blocks(self, net):
        return [*net.transformer_blocks, *net.single_transformer_blocks]

    def conditioning(self, net):
        return "text"
