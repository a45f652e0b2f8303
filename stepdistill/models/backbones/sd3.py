"""diffusers SD3Transformer2DModel: Stable Diffusion 3 / 3.5 (text tokens and a pooled embedding)."""
from __future__ import annotations

from torch import nn

from ...registry import register
from ..conditioning import unpack_pooled
from . import TransformerBackbone


@register("backbone", "sd3")
class SD3Backbone(TransformerBackbone):
    name = "SD3Transformer2DModel"
    image_output = 1  # a JointTransformerBlock returns (text tokens, image tokens)

    @staticmethod
    def claims(net: nn.Module) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(net, SD3Transformer2DModel)

    def call(self, score, net, x, timestep, cond):
        tokens, pooled = unpack_pooled(cond.to(x.dtype), net.config.pooled_projection_dim)
        return net(x, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=timestep).sample

    def conditioning(self, net):
        return "text"
