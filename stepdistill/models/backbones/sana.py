"""diffusers SanaTransformer2DModel: SANA and SANA-Sprint (the attention mask travels as the condition's last
column; SANA-Sprint embeds its guidance scale)."""
from __future__ import annotations

from torch import nn

from ...registry import register
from . import TransformerBackbone


@register("backbone", "sana")
class SanaBackbone(TransformerBackbone):
    name = "SanaTransformer2DModel"

    @staticmethod
    def claims(net: nn.Module) -> bool:
        from diffusers import SanaTransformer2DModel

        return isinstance(net, SanaTransformer2DModel)

    def call(self, score, net, x, timestep, cond):
        cond = cond.to(x.dtype)
        guidance = None
        if net.config.guidance_embeds:  # SANA-Sprint's guidance embedding, as SanaSprintPipeline feeds it
            guidance = score.guidance_vector(len(x), x.device) * net.config.guidance_embeds_scale
        out = net(x, encoder_hidden_states=cond[..., :-1], encoder_attention_mask=cond[..., -1],
                  timestep=timestep * net.config.timestep_scale, guidance=guidance).sample
        return out[:, :x.shape[1]]  # a learned-sigma head's first half is the prediction

    def add_guidance_embedding(self, net):
        """SANA-Sprint's guidance_embeds: the time embedding becomes SanaCombinedTimestepGuidanceEmbeddings with the
        old time embedder's weights and a zero-initialised guidance embedder's output layer."""
        if net.config.guidance_embeds:
            return False
        from diffusers.models.transformers.sana_transformer import SanaCombinedTimestepGuidanceEmbeddings

        old = net.time_embed  # AdaLayerNormSingle: the same time embedder and output layer
        new = SanaCombinedTimestepGuidanceEmbeddings(old.linear.in_features).to(old.linear.weight)
        new.timestep_embedder.load_state_dict(old.emb.timestep_embedder.state_dict())
        new.linear.load_state_dict(old.linear.state_dict())
        nn.init.zeros_(new.guidance_embedder.linear_2.weight)
        nn.init.zeros_(new.guidance_embedder.linear_2.bias)
        net.time_embed = new
        net.register_to_config(guidance_embeds=True)
        return True

    def conditioning(self, net):
        return "text"
