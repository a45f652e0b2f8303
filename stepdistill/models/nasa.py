"""NASA: negative-prompt guidance inside cross-attention, for one-step students (SNOOPI, Nguyen et al. 2024).

A one-step student has no second denoising pass to subtract, so classifier-free negative prompting does not apply.
NASA edits every cross-attention layer instead: with attention A(q, K, V) = softmax(q K^T / sqrt(d)) V, the layer
outputs out_proj(A(q, K_pos, V_pos) - scale * A(q, K_neg, V_neg)), the second term computed from the negative
prompt's embeddings. Training-free; it costs one extra attention per cross-attention layer.

    with negative_prompt_attention(unet, negative_embeds, scale=0.5):
        x0 = student(z, prompt_embeds)
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


class NASAProcessor:
    """A diffusers attention processor for cross-attention layers (self-attention passes through unchanged)."""

    def __init__(self, negative: torch.Tensor, scale: float, fallback) -> None:
        self.negative, self.scale, self.fallback = negative, scale, fallback

    def _attend(self, attn, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if attn.norm_cross is not None:
            context = attn.norm_encoder_hidden_states(context)
        k, v = attn.to_k(context), attn.to_v(context)
        b, heads = q.shape[0], attn.heads

        def split(x):
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1])

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None or hidden_states.ndim != 3 or attn.group_norm is not None or \
                attn.spatial_norm is not None or attention_mask is not None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        q = attn.to_q(hidden_states)
        negative = self.negative.to(encoder_hidden_states).expand(len(hidden_states), -1, -1)
        out = self._attend(attn, q, encoder_hidden_states) - self.scale * self._attend(attn, q, negative)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextmanager
def negative_prompt_attention(unet: nn.Module, negative: torch.Tensor, scale: float):
    """Apply NASA to every cross-attention layer of a diffusers UNet2DConditionModel while the block runs.
    negative: (1 or N, L, C) embeddings of the negative prompt, in the same encoder space as the prompts."""
    from diffusers.models.attention_processor import Attention

    if negative.ndim != 3:
        raise ValueError(f"negative prompt embeddings must be (1 or N, tokens, channels), got {tuple(negative.shape)}")
    saved = unet.attn_processors
    cross = {name for name, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}
    if not cross:
        raise InputError("this network has no cross-attention layers: NASA needs a text-conditioned UNet")
    unet.set_attn_processor({name: NASAProcessor(negative, scale, proc) if name[:-len(".processor")] in cross
                             else proc for name, proc in saved.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(saved)
