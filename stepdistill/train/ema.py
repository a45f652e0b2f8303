"""Exponential moving average of a network's weights."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Averages the trainable parameters; frozen ones (a LoRA student's base weights) are shared, not copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(model, frozen).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            if p.requires_grad:
                p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
