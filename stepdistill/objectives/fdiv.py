"""f-distill: distribution matching under any f-divergence.

Xu, Nie, Vahdat, "One-step Diffusion Models with f-Divergence Distribution Matching" (2025), eq. (8)-(10); see
docs/methods.md. The gradient of D_f(p || q) is the VSD direction weighted per sample by h(r) = f''(r) r^2 with
r = p_t / q_t the density ratio at the noised sample. r comes from the discriminator that DMD2's GAN term trains
(logit ~ log p/q), read at the same x_t and t as the VSD term: r = exp(clamp(logit, -10, 10)), clamped to [0.1, 20].
With `ratio_bins` = k > 0 (default 10) r is then divided by its mean within its time bin (k equal bins over the
whole time range [0, 1]; `ratio_ema` > 0 keeps an EMA of the bin means, saved with checkpoints): a discriminator
calibrated differently per noise level (fakes easy to spot at low noise, r ~ 0.1, not at high, r ~ 1) would
otherwise turn h into a time weighting. h is then divided by its batch mean, so only its shape matters. Bin means
and the batch mean are global across processes (all-reduce). Reverse KL gives h = 1: exactly VSD.

f-distill needs the generator's adversarial term: `gan_weight` > 0 (default 1e-3), and the logits it reads are
those of the same pass. The discriminator trains at the generator's times (`gan_t_min`/`gan_t_max` default to
[t_min, t_max] here, not DMD2's full range), as FastGen draws both from its sample_t_cfg.

Reference code: NVlabs/FastGen fastgen/methods/distribution_matching/f_distill.py, FdistillModel
(_get_f_div_weighting_h, _student_update_step); config fastgen/configs/methods/config_f_distill.py. Deliberate
differences: the bins are over canonical t in [0, 1] (FastGen bins its scheduler's own t over [min_t, max_t]: the
same on VP and flow schedules, linear in sigma on EDM ones); FastGen's 1e-6 guards on the bin counts, bin means
and h's mean are left out, as every divisor here is >= 0.1 (r is clamped first) or a count >= 1, which also keeps
reverse KL bit-identical to VSD; the discriminator is DMD2's head on the fake score, not FastGen's on the teacher.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RecipeError
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
    ratio_bins: int = 10  # r divided by its mean per time bin (FastGen's bin_num); 0 = off
    ratio_ema: float = 0.0  # EMA rate of the bin means (FastGen's ratio_ema_rate: 0, ImageNet-64 0.5)
    gan_weight: float = 1e-3  # the generator's adversarial weight, > 0 (FastGen's default; ImageNet 3e-3)
    gan_t_min: float = 0.02  # the discriminator's times: the generator's, as FastGen draws both from one distribution
    gan_t_max: float = 0.98


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed elementwise over processes (an all-reduce when torch.distributed is running)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the whole batch across processes."""
    total = global_sum(torch.stack([x.sum(), x.new_full((), float(x.numel()))]))
    return total[0] / total[1]


@register("objective", "fdiv")
class FDiv(VSD):
    contract_overrides = ("objective.gan_weight=0.01",)
    guided_overrides = ()
    Config = FDivConfig
    logits_at_dm_pass = True

    @classmethod
    def needs_for(cls, cfg) -> frozenset[str]:
        return cls.needs | {"discriminator", "data"}  # the density ratio comes from a discriminator on real data

    def __init__(self, cfg: FDivConfig, nets, shape: tuple[int, ...]) -> None:
        if cfg.divergence not in H:
            raise RecipeError(f"unknown objective.divergence {cfg.divergence!r}; choose one of {', '.join(H)}")
        if not 0 < cfg.ratio_min <= cfg.ratio_max:
            raise RecipeError(f"need 0 < objective.ratio_min <= objective.ratio_max, got {cfg.ratio_min}, "
                              f"{cfg.ratio_max}")
        if cfg.gan_weight <= 0:
            raise RecipeError(f"objective fdiv needs objective.gan_weight > 0 (got {cfg.gan_weight}): f-distill trains "
                              "the generator's adversarial term with the discriminator its density ratio comes from "
                              "(FastGen asserts it); its default is 1e-3")
        if cfg.ratio_bins < 0:
            raise RecipeError(f"objective.ratio_bins must be >= 0 (0 turns the per-time normalisation off), got "
                              f"{cfg.ratio_bins}")
        if not 0 <= cfg.ratio_ema < 1:
            raise RecipeError(f"objective.ratio_ema must be in [0, 1) (0: this batch's bin means), got {cfg.ratio_ema}")
        super().__init__(cfg, nets, shape)
        self.bins = nn.Module()  # a module, so that objective.to(device) moves the buffer
        self.bins.register_buffer("mean", torch.ones(cfg.ratio_bins))  # FastGen starts every bin at 1

    def bin_means(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Each sample's bin mean of r. Bins of width 1/k over [0, 1] (t = 1 joins the last); the means are global
        across processes; a bin with no sample this batch keeps its value, the others move to
        ema * old + (1 - ema) * this batch's mean."""
        k, ema = self.cfg.ratio_bins, self.cfg.ratio_ema
        idx = (t.double() * k).floor().long().clamp(0, k - 1)
        # index_add_ rather than bincount: the same sums, but a fixed output size (bincount's depends on the data,
        # which makes a GPU wait for the host and has no meta kernel for `stepdistill plan`)
        count, total = global_sum(torch.stack([r.new_zeros(k).index_add_(0, idx, torch.ones_like(r)),
                                               r.new_zeros(k).index_add_(0, idx, r)]))
        old = self.bins.mean.to(r.device)
        new = torch.where(count > 0, ema * old + (1 - ema) * total / count.clamp_min(1), old)
        self.bins.mean.copy_(new)
        return new[idx]

    def weight(self, logits: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        r = logits.float().clamp(-cfg.logit_clamp, cfg.logit_clamp).exp().clamp(cfg.ratio_min, cfg.ratio_max)
        if cfg.ratio_bins > 0:
            r = r / self.bin_means(r, t.to(r.device))
        h = H[cfg.divergence](r)
        return h / global_mean(h)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ratio_bins": self.bins.mean} if self.cfg.ratio_bins > 0 else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = sorted(set(state) - {"ratio_bins"})
        if unknown:
            raise ValueError(f"FDiv keeps only ratio_bins, but the checkpoint has {unknown[:3]}")
        if "ratio_bins" in state:  # a checkpoint from before the bins has none: they start at 1
            saved = state["ratio_bins"]
            if saved.shape != self.bins.mean.shape:
                raise RecipeError(f"the checkpoint has {len(saved)} density-ratio bins and the recipe "
                                  f"objective.ratio_bins={self.cfg.ratio_bins}: resume with the checkpoint's value")
            self.bins.mean.copy_(saved)
