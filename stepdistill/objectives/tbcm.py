"""TBCM: image-free sCM on the teacher's own sampling trajectories (hustvl/TBCM, `train_tbcm.py`; METHODS.md 4b).

Each iteration runs the teacher's probability-flow ODE from pure noise along a `route_points`-point route of TrigFlow
angles, with first-order steps x <- cos(d) x - sin(d) dx/dtheta (DDIM in TrigFlow, with the teacher's guidance), and
every point it passes through, with the velocity the teacher computed there, is an sCM training point (route_points
- 1 per trajectory, or a random `route_pairs` of them, so that a batch holds more and less correlated trajectories).
The route is uniform in u in [0, 1] (the first point fixed at u = 1, i.e. theta = pi/2, every other point jittered
within its interval), mapped through the flow-matching shift s = shift u / (1 + (shift - 1) u) and
theta = atan(s / ((1 - s) sigma_d)). The loss is sCM's (objectives/scm.py) unchanged, so no dataset is needed.
TBCM's black-image filter for latent trajectories is not implemented.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import parallel
from ..diffusion.schedules import bcast
from ..diffusion.trigflow import trigflow_velocity
from ..registry import register
from .base import Batch
from .scm import SCM, SCMConfig

THETA_MAX = float(torch.nextafter(torch.tensor(math.pi / 2), torch.tensor(0.0)))  # float32 just below pi/2


@dataclass
class TBCMConfig(SCMConfig):
    name: str = "tbcm"
    route_points: int = 16  # points per teacher trajectory (TBCM: 16, giving 15 training pairs)
    route_shift: float = 2.5  # flow-matching shift of the route (TBCM's 1024-px latents: 2.5; 1 spaces it evenly)
    route_pairs: int | None = None  # training points kept per trajectory, drawn at random (None: all of them);
    #                                 fewer means more trajectories per batch, so less correlated points


def route(m: int, points: int, shift: float, sigma_d: float) -> torch.Tensor:
    """(m, points) decreasing TrigFlow angles, the first pi/2, the others jittered within equal intervals of u."""
    k = torch.arange(1, points, dtype=torch.float64)
    u = 1 - (k + parallel.rand(m, points - 1, dtype=torch.float64)) / points  # point k in [1 - (k+1)/P, 1 - k/P)
    u = torch.cat([torch.ones(m, 1, dtype=torch.float64), u], dim=1)
    s = shift * u / (1 + (shift - 1) * u)
    return torch.atan2(s, (1 - s) * sigma_d).float().clamp(max=THETA_MAX)


@register("objective", "tbcm")
class TBCM(SCM):
    Config = TBCMConfig
    needs = frozenset({"teacher"})

    def __init__(self, cfg: TBCMConfig, nets, shape: tuple[int, ...]) -> None:
        if cfg.route_points < 2 or cfg.route_shift <= 0:
            raise ValueError(f"objective.route_points must be >= 2 and objective.route_shift > 0, got "
                             f"{cfg.route_points} and {cfg.route_shift}")
        if cfg.route_pairs is not None and not 1 <= cfg.route_pairs < cfg.route_points:
            raise ValueError(f"objective.route_pairs must be between 1 and route_points - 1 = {cfg.route_points - 1} "
                             f"(or null for all), got {cfg.route_pairs}")
        if cfg.adv_weight > 0:
            raise ValueError("objective tbcm is image-free and LADD needs real images: set objective.adv_weight=0 "
                             f"(got {cfg.adv_weight}) or use objective scm for sCM + LADD")
        super().__init__(cfg, nets, shape)

    @torch.no_grad()
    def training_points(self, batch: Batch):
        cfg, sd = self.cfg, self.cfg.sigma_data
        pairs = cfg.route_points - 1
        keep = cfg.route_pairs or pairs
        m = math.ceil(batch.n / keep)  # trajectories: their cond are the batch's first m
        cond = None if batch.cond is None else batch.cond[:m]
        theta = route(m, cfg.route_points, cfg.route_shift, sd)
        x = sd * parallel.randn(m, *self.shape)
        xs, dxdts = [], []
        for i in range(pairs):
            dxdt = sd * trigflow_velocity(self.nets.teacher, x, theta[:, i], cond, sd, cfg.guidance_scale)
            xs.append(x)
            dxdts.append(dxdt)
            d = theta[:, i] - theta[:, i + 1]
            x = bcast(d.cos(), x) * x - bcast(d.sin(), x) * dxdt
        # `keep` random points per trajectory, then n of those (point j lies on trajectory j // pairs)
        kept = (parallel.rand(m, pairs).argsort(dim=1)[:, :keep] + pairs * torch.arange(m)[:, None]).flatten()
        pick = kept[torch.randperm(len(kept))[:batch.n]]
        flat = lambda ts: torch.stack(ts, dim=1).flatten(0, 1)[pick]  # noqa: E731
        pair_cond = None if cond is None else cond.repeat_interleave(pairs, dim=0)[pick]
        return flat(xs), theta[:, :-1].flatten()[pick], flat(dxdts), pair_cond
