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
        pairs = [(p_ema, p.detach().to(p_ema.dtype)) for p_ema, p in zip(self.model.parameters(), model.parameters())
                 if p.requires_grad]
        if pairs:  # one lerp over the list: the same per-element update as a loop of lerp_, without its overhead
            torch._foreach_lerp_(*map(list, zip(*pairs)), 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
