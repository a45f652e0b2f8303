"""diffusers UNet2DConditionModel: Stable Diffusion 1.x/2.x and SDXL (pooled text embedding and size/crop time ids),
and LCM-style students with a guidance-scale embedding."""
from __future__ import annotations

from torch import nn

from ...devices import to_device
from ...diffusion.guidance import guidance_scale_embedding
from ...registry import register
from ..conditioning import unpack_pooled
from . import Backbone
from .unet import unet_bottleneck, unet_levels

GUIDANCE_EMBED_DIM = 256  # a UNet student's time_cond_proj_dim (LCM-SD's)


@register("backbone", "unet-text")
class TextUNetBackbone(Backbone):
    name = "UNet2DConditionModel"

    @staticmethod
    def claims(net: nn.Module) -> bool:
        from diffusers import UNet2DConditionModel

        return isinstance(net, UNet2DConditionModel)

    def call(self, score, net, x, timestep, cond):
        c, dtype = net.config, x.dtype
        if c.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size/crop time ids
            tokens, pooled = unpack_pooled(cond.to(dtype), c.projection_class_embeddings_input_dim
                                           - len(score.time_ids) * c.addition_time_embed_dim)
            time_ids = to_device(score.time_ids, x.device).to(x.dtype)
            added = {"text_embeds": pooled, "time_ids": time_ids.expand(len(x), -1)}
            return net(x, timestep, encoder_hidden_states=tokens, added_cond_kwargs=added).sample
        embedded = None
        if c.time_cond_proj_dim is not None and score.guidance_input is not None:  # diffusers' LCM convention
            embedded = guidance_scale_embedding(score.guidance_vector(len(x), x.device) - 1,
                                                c.time_cond_proj_dim).to(dtype)
        return net(x, timestep, encoder_hidden_states=cond.to(dtype), timestep_cond=embedded).sample

    def bottleneck(self, net):
        return unet_bottleneck(net)

    def levels(self, net):
        return unet_levels(net)

    def add_guidance_embedding(self, net):
        """diffusers' LCM mechanism: time_cond_proj_dim and a zero-initialised time_embedding.cond_proj."""
        if net.config.time_cond_proj_dim is not None:
            return False
        emb = net.time_embedding
        emb.cond_proj = nn.Linear(GUIDANCE_EMBED_DIM, emb.linear_1.in_features, bias=False).to(emb.linear_1.weight)
        nn.init.zeros_(emb.cond_proj.weight)
        net.register_to_config(time_cond_proj_dim=GUIDANCE_EMBED_DIM)
        return True

    def conditioning(self, net):
        return "text"
