"""f-distill: distribution matching under any f-divergence.

Xu, Nie, Vahdat, "One-step Diffusion Models with f-Divergence Distribution Matching" (2025), eq. (8)-(10);
NVlabs/FastGen `f_distill.py`. The gradient of D_f(p || q) is the VSD direction weighted per sample by
h(r) = f''(r) r^2 with r = p_t / q_t the density ratio at the noised sample. r comes from the discriminator that
DMD2's GAN term already trains (logit ~ log p/q): r = exp(clamp(logit, -10, 10)), clamped to [0.1, 20], at the same
x_t as the VSD term. h is then divided by its batch mean (global across processes), so only its shape matters.
Reverse KL gives h = 1: exactly VSD.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .vsd import VSD, VSDConfig

# h(r) = f''(r) r^2 for each divergence (FastGen's table; checked by hand)
H = {
    "rkl": lambda r: torch.ones_like(r),  # reverse KL (VSD / DMD)
    "kl": lambda r: r,  # forward KL
    "js": lambda r: r / (1 + r),  # Jensen-Shannon (the paper's best)
    "sf": lambda r: 1 / (1 + r),  # softened reverse KL
    "neyman": lambda r: 1 / r,  # Neyman chi^2
    "sh": lambda r: r.sqrt(),  # squared Hellinger
    "jf": lambda r: 1 + r,  # Jeffreys
}


@dataclass
class FDivConfig(VSDConfig):
    name: str = "fdiv"
    divergence: str = "js"  # one of H's keys
    logit_clamp: float = 10.0  # logits clamped to +-this (in fp32) before exp
    ratio_min: float = 0.1
    ratio_max: float = 20.0
    gan_weight: float = 0.0  # the generator's own adversarial term (FastGen: ImageNet 3e-3); D is trained regardless


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the whole batch across processes (an all-reduce when torch.distributed is running)."""
    import torch.distributed as dist

    total = torch.stack([x.sum(), torch.tensor(float(x.numel()), device=x.device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return total[0] / total[1]


@register("objective", "fdiv")
class FDiv(VSD):
    Config = FDivConfig

    @classmethod
    def needs_for(cls, cfg) -> frozenset[str]:
        return cls.needs | {"discriminator", "data"}  # the density ratio comes from a discriminator on real data

    def __init__(self, cfg: FDivConfig, nets, shape: tuple[int, ...]) -> None:
        if cfg.divergence not in H:
            raise ValueError(f"unknown objective.divergence {cfg.divergence!r}; choose one of {', '.join(H)}")
        if not 0 < cfg.ratio_min <= cfg.ratio_max:
            raise ValueError(f"need 0 < objective.ratio_min <= objective.ratio_max, got {cfg.ratio_min}, "
                             f"{cfg.ratio_max}")
        super().__init__(cfg, nets, shape)

    def weight(self, logits: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        r = logits.float().clamp(-cfg.logit_clamp, cfg.logit_clamp).exp().clamp(cfg.ratio_min, cfg.ratio_max)
        h = H[cfg.divergence](r)
        return h / global_mean(h)
