"""Classifier-free guidance in the canonical form."""
from __future__ import annotations

import torch

from .parametrization import Prediction
from .schedules import bcast


def cfg_combine(uncond: Prediction, cond: Prediction, scale: float | torch.Tensor) -> Prediction:
    """x0 = x0_u + w (x0_c - x0_u), likewise eps. Both are affine in the network output at the same x_t, so guiding
    in x0 or eps space is the same guidance (unlike guiding v or flow outputs with a time-dependent mix). `scale` is
    one float or a (N,) tensor of per-sample scales (SANA-Sprint draws each sample's from a set)."""
    if torch.is_tensor(scale):
        scale = bcast(scale.float(), cond.x0)
    return Prediction(uncond.x0 + scale * (cond.x0 - uncond.x0), uncond.eps + scale * (cond.eps - uncond.eps))


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) scales -> (N, dim) sinusoidal features of 1000 w (sin half, then cos half; zero-padded for odd dim): the
    embedding diffusers' LCM and Stable Diffusion pipelines give a UNet's `timestep_cond` (they pass w = scale - 1)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device)
                      * -(torch.log(torch.tensor(10000.0)) / (half - 1)).item())
    args = 1000.0 * w.float()[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))
