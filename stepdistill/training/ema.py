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
    def update(self, model: nn.Module, where: torch.Tensor | None = None) -> None:
        """One step towards `model`; with `where` (a 0-d bool tensor) only where it holds, without reading it back."""
        pairs = [(p_ema, p.detach().to(p_ema.dtype)) for p_ema, p in zip(self.model.parameters(), model.parameters())
                 if p.requires_grad]
        if pairs and where is None:  # one lerp over the list: lerp_'s per-element update without a loop's overhead
            torch._foreach_lerp_(*map(list, zip(*pairs)), 1.0 - self.decay)
        elif pairs:  # weight 0 where the step was skipped (the weights are unchanged and finite: the EMA stays put);
            # a lerp by a tensor weight as three list ops, each one launch on a GPU (lerp with a list of 0-d weights
            # would launch once per tensor there)
            ema, new = map(list, zip(*pairs))
            step = torch._foreach_sub(new, ema)
            torch._foreach_mul_(step, (1.0 - self.decay) * where.float())
            torch._foreach_add_(ema, step)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            if where is None:
                b_ema.copy_(b)
            else:
                b_ema.copy_(torch.where(where, b, b_ema))
