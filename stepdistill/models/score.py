"""ScoreModel: any denoising network + its schedule + its prediction kind -> predict(x_t, t, cond) = (x0, eps).

This is the boundary of the canonical form. Everything beyond it (objectives, solvers, the trainer) sees canonical
time t in [0, 1] and Prediction(x0, eps), whatever the backbone predicts and however it counts time.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..diffusion.guidance import cfg_combine
from ..diffusion.parametrization import KINDS, Prediction, to_prediction
from ..diffusion.schedules import Schedule

Conditioning = Literal["none", "class", "text"]


def device_of(module: nn.Module) -> torch.device:
    """The device a module computes on: its first parameter's or buffer's (the CPU when it has none)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def move_modules(owner: object, device: torch.device) -> None:
    """Move every nn.Module attribute of a plain object (a teacher, an objective) to `device`."""
    for value in vars(owner).values():
        if isinstance(value, nn.Module):
            value.to(device)


class ScoreModel(nn.Module):
    """Wraps `net` (diffusers UNet2DModel / UNet2DConditionModel, or an MLPDenoiser).

    cond: None for unconditional nets; (N,) int64 labels for class-conditional ones (label `null_label` means
    unconditional); (N, L, C) text conditions for cross-attention nets (`null_cond` is the unconditional one), whose
    last row holds the pooled embedding for SDXL UNets and SD3 transformers (models/conditioning.py); SDXL's
    micro-conditioning `time_ids` (original size, crop, target size) are fixed per teacher and kept here, as is
    FLUX-dev's embedded guidance scale `guidance_input` (a network input, not classifier-free guidance).
    """

    def __init__(self, net: nn.Module, schedule: Schedule, prediction: str, conditioning: Conditioning = "none",
                 null_label: int | None = None, null_cond: torch.Tensor | None = None,
                 time_ids: torch.Tensor | None = None, guidance_input: float | None = None) -> None:
        super().__init__()
        if prediction not in KINDS:
            raise ValueError(f"unknown prediction kind {prediction!r}; expected one of {', '.join(KINDS)}")
        if conditioning == "class" and null_label is None:
            raise ValueError("a class-conditional ScoreModel needs null_label (the label meaning 'no class')")
        self.net, self.schedule, self.prediction = net, schedule, prediction
        self.conditioning, self.null_label = conditioning, null_label
        self.register_buffer("null_cond", null_cond, persistent=False)
        self.register_buffer("time_ids", time_ids, persistent=False)
        self.guidance_input = guidance_input

    def like(self, net: nn.Module) -> ScoreModel:
        """The same wrapper (schedule, prediction, conditioning) around another network of this family."""
        return ScoreModel(net, self.schedule, self.prediction, self.conditioning, self.null_label, self.null_cond,
                          self.time_ids, self.guidance_input)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> Prediction:
        """x_t (N, ...), t (N,) canonical -> Prediction with x0, eps of x_t's shape (float32)."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        out = self._call_net(x_t, self.schedule.native(t).float().to(x_t.device), cond)
        return to_prediction(self.prediction, out, x_t, alpha.to(x_t.device), sigma.to(x_t.device))

    predict = forward

    def _call_net(self, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        from diffusers import (
            FluxTransformer2DModel,
            SanaTransformer2DModel,
            SD3Transformer2DModel,
            UNet2DConditionModel,
            UNet2DModel,
        )

        from .conditioning import unpack_pooled

        net = self.net
        net_dtype = next(net.parameters()).dtype
        x = x.to(net_dtype)
        if isinstance(net, UNet2DModel):
            return net(x, timestep, class_labels=cond if self.conditioning == "class" else None).sample
        if isinstance(net, UNet2DConditionModel):
            c = net.config
            if c.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size/crop time ids
                tokens, pooled = unpack_pooled(cond.to(net_dtype), c.projection_class_embeddings_input_dim
                                               - len(self.time_ids) * c.addition_time_embed_dim)
                added = {"text_embeds": pooled, "time_ids": self.time_ids.to(x).expand(len(x), -1)}
                return net(x, timestep, encoder_hidden_states=tokens, added_cond_kwargs=added).sample
            return net(x, timestep, encoder_hidden_states=cond.to(net_dtype)).sample
        if isinstance(net, SD3Transformer2DModel):
            tokens, pooled = unpack_pooled(cond.to(net_dtype), net.config.pooled_projection_dim)
            return net(x, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=timestep).sample
        if isinstance(net, FluxTransformer2DModel):
            return self._call_flux(net, x, timestep, cond.to(net_dtype))
        if isinstance(net, SanaTransformer2DModel):  # the attention mask is the condition's last column
            cond = cond.to(net_dtype)
            out = net(x, encoder_hidden_states=cond[..., :-1], encoder_attention_mask=cond[..., -1],
                      timestep=timestep * net.config.timestep_scale).sample
            return out[:, :x.shape[1]]  # a learned-sigma head's first half is the prediction
        return net(x, timestep) if self.conditioning == "none" else net(x, timestep, cond)

    def _call_flux(self, net: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """FLUX: 2x2 patches of the latent as tokens with their (0, row, column) ids, time in [0, 1], the pooled CLIP
        row, and the embedded guidance for guidance-distilled (dev) networks."""
        from .conditioning import unpack_pooled

        n, c, h, w = x.shape
        tokens = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, c * 4)
        ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
        ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        text, pooled = unpack_pooled(cond, net.config.pooled_projection_dim)
        guidance = None
        if net.config.guidance_embeds:  # FLUX-dev
            if self.guidance_input is None:
                raise ValueError("this FLUX network embeds a guidance scale: set the ScoreModel's guidance_input")
            guidance = torch.full((n,), float(self.guidance_input), device=x.device)
        out = net(tokens, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep / 1000,
                  img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text.shape[1], 3, device=x.device),
                  guidance=guidance).sample
        return out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)

    def null(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """The unconditional counterpart of a batch of conditions (for classifier-free guidance)."""
        if self.conditioning == "none" or cond is None:
            return None
        if self.conditioning == "class":
            return torch.full_like(cond, self.null_label)
        if self.null_cond is None:
            raise ValueError("this text-conditional model has no null embedding; pass null_cond when building it")
        return self.null_cond.to(cond).expand_as(cond)

    def guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, scale: float) -> Prediction:
        """Classifier-free guided prediction; one batched call for [uncond, cond] (scale 1 = plain prediction)."""
        if scale == 1.0 or self.conditioning == "none" or cond is None:
            return self(x_t, t, cond)
        both = self(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([self.null(cond), cond]))
        n = len(x_t)
        return cfg_combine(Prediction(both.x0[:n], both.eps[:n]), Prediction(both.x0[n:], both.eps[n:]), scale)
