"""TBCM: image-free sCM on the teacher's own sampling trajectories (hustvl/TBCM, `train_tbcm.py`; docs/methods.md).

Each iteration runs the teacher's probability-flow ODE from pure noise along a `route_points`-point route of TrigFlow
angles, with first-order steps x <- cos(d) x - sin(d) dx/dtheta (DDIM in TrigFlow, with the teacher's guidance). The
teacher is evaluated at every point; every point after the start (pi/2, pure noise), with the velocity the teacher
computed there, is an sCM training point (route_points - 1 per trajectory, or a random `route_pairs` of them, so that
a batch holds more and less correlated trajectories). The loss is sCM's (objectives/scm.py) unchanged, so no dataset
is needed. TBCM's black-image filter for latent trajectories and its late "calm-down" of the tangent warm-up r
(to 0.75 after step 15000) are not implemented.

`route_spacing: shift` is TBCM's route as hustvl/TBCM draws it (`compute_refer_route`,
`sample_ordered_timesteps_from_ref`): reference points evenly spaced in u from 1 down to the shifted 1/1000, mapped
through the flow-matching shift s = shift u / (1 + (shift - 1) u) (the reference shifts the end points and then the
grid again; so do we) and the angle whose noise-to-signal ratio is the flow's s / (1 - s): theta = atan(s / (1 - s))
in SANA's convention (`trigflow: sana`, TBCM's own), atan(s / ((1 - s) sigma_d)) in Lu & Song's (`trigflow: scm`);
point k >= 1 uniform in angle between reference points k and k - 1. Reference: hustvl/TBCM
`diffusion/utils/tbcm_utils.py` (`compute_refer_route`, `sample_ordered_timesteps_from_ref`) and
`train_scripts/train_tbcm.py` (the trajectory from noise x sigma_d, x <- cos(d) x - sin(d) dx/dtheta, sCM's loss on
all points after the first); deliberate differences: our route is drawn per trajectory, the reference's once per
batch, and the black-image filter and calm-down are left out (above).

`route_spacing: scm` replaces the route's angles by stratified draws of sCM's own proposal theta = atan(exp(p_mean +
p_std Phi^-1(u)) / sigma_d), u jittered within route_points - 1 equal intervals of (0, 1], so the training angles
have exactly sCM's distribution, one per stratum and trajectory. On the Gaussian mixture (configs/toy/gmm_tbcm.yaml,
one point per trajectory) this converges (energy distance 0.026 after 4000 iterations, 0.043-0.057 after 3000) and
TBCM's route at shift 1 does not (0.30-0.78 after 3000, seeds 0-2): half of the route's angles lie above 1.05 rad,
where sCM's proposal puts 27% of its angles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import parallel
from ..devices import to_device
from ..diffusion.schedules import bcast
from ..diffusion.trigflow import TrigFlowSpace
from ..errors import RecipeError
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
    route_spacing: str = "shift"  # shift: TBCM's route; scm: stratified draws of sCM's proposal (p_mean, p_std);
    #                               either way the start at pi/2 is not a training point


def route(m: int, points: int, shift: float, trig: TrigFlowSpace) -> torch.Tensor:
    """(m, points) decreasing TrigFlow angles of TBCM's route (its compute_refer_route and
    sample_ordered_timesteps_from_ref): reference points evenly spaced in u from 1 down to the shifted 1/1000,
    through the flow shift (applied to the end points and again to the grid, as the reference does), at the angles
    with the flow's noise-to-signal ratio s / (1 - s); the first point pi/2, point k >= 1 uniform in angle between
    reference points k and k - 1."""
    def shifted(u):
        return shift * u / (1 + (shift - 1) * u)

    s = shifted(torch.linspace(1.0, shifted(1e-3), points, dtype=torch.float64))
    ref = trig.theta_of_ratio(s / (1 - s))
    theta = ref[1:] + torch.rand(m, points - 1, dtype=torch.float64) * (ref[:-1] - ref[1:])
    return torch.cat([torch.full((m, 1), math.pi / 2, dtype=torch.float64), theta], dim=1).float().clamp(max=THETA_MAX)


def scm_route(m: int, points: int, p_mean: float, p_std: float, sigma_d: float) -> torch.Tensor:
    """(m, points) decreasing TrigFlow angles, the first pi/2, the other points - 1 one draw each of sCM's proposal
    theta = atan(exp(p_mean + p_std Phi^-1(u)) / sigma_d) within equal strata of u in (0, 1]."""
    k = torch.arange(points - 1, dtype=torch.float64)
    u = 1 - (k + torch.rand(m, points - 1, dtype=torch.float64)) / (points - 1)  # point k + 1: stratum k
    theta = torch.atan2(torch.exp(p_mean + p_std * torch.special.ndtri(u)), torch.tensor(sigma_d, dtype=torch.float64))
    return torch.cat([torch.full((m, 1), math.pi / 2, dtype=torch.float64), theta], dim=1).float().clamp(max=THETA_MAX)


@register("objective", "tbcm")
class TBCM(SCM):
    contract_overrides = ("objective.route_points=4",)
    Config = TBCMConfig
    needs = frozenset({"teacher"})

    def __init__(self, cfg: TBCMConfig, nets, shape: tuple[int, ...]) -> None:
        if cfg.route_points < 2 or cfg.route_shift <= 0:
            raise RecipeError(f"objective.route_points must be >= 2 and objective.route_shift > 0, got "
                              f"{cfg.route_points} and {cfg.route_shift}")
        if cfg.route_pairs is not None and not 1 <= cfg.route_pairs < cfg.route_points:
            raise RecipeError(f"objective.route_pairs must be between 1 and route_points - 1 = {cfg.route_points - 1} "
                              f"(or null for all), got {cfg.route_pairs}")
        if cfg.route_spacing not in ("shift", "scm"):
            raise RecipeError(f"unknown objective.route_spacing {cfg.route_spacing!r}; choose shift or scm")
        if cfg.adv_weight > 0:
            raise RecipeError("objective tbcm is image-free and LADD needs real images: set objective.adv_weight=0 "
                              f"(got {cfg.adv_weight}) or use objective scm for sCM + LADD")
        super().__init__(cfg, nets, shape)

    @torch.no_grad()
    def training_points(self, batch: Batch):
        """The global batch's trajectories and training points are drawn alike on every process; each process then
        runs only the trajectories its rows of the points lie on (points sorted by trajectory, so about 1/world of
        them). Any number of processes therefore trains on the points one process would."""
        cfg, sd = self.cfg, self.cfg.sigma_data
        pairs = cfg.route_points - 1
        keep = cfg.route_pairs or pairs
        n = batch.n * parallel.world()  # the global batch
        m = math.ceil(n / keep)  # trajectories: their cond are the global batch's first m
        if cfg.route_spacing == "scm":
            theta = scm_route(m, cfg.route_points, cfg.p_mean, cfg.p_std, sd)
        else:
            theta = route(m, cfg.route_points, cfg.route_shift, self.trig)
        noise = torch.randn(m, *self.shape)
        # `keep` random points per trajectory, then n of those (point j lies on trajectory j // pairs), in order
        kept = (torch.rand(m, pairs).argsort(dim=1)[:, :keep] + pairs * torch.arange(m)[:, None]).flatten()
        pick = parallel.rows(kept[torch.randperm(len(kept))[:n]].sort().values)
        first, last = int(pick[0]) // pairs, int(pick[-1]) // pairs + 1  # this process's trajectories
        theta, pick = theta[first:last], pick - first * pairs
        cond = None if batch.cond is None else to_device(torch.cat(parallel.gather([batch.cond]))[first:last],
                                                         self.device)
        x = sd * to_device(noise[first:last], self.device)
        xs, dxdts = [], []
        for i in range(cfg.route_points):  # the teacher at every point; training on all but the start (pi/2)
            dxdt = sd * self.trig.velocity(self.nets.teacher, x, theta[:, i], cond, cfg.guidance_scale)
            if i > 0:
                xs.append(x)
                dxdts.append(dxdt)
            if i + 1 < cfg.route_points:
                d = theta[:, i] - theta[:, i + 1]
                x = bcast(d.cos(), x) * x - bcast(d.sin(), x) * dxdt
        flat = lambda ts: torch.stack(ts, dim=1).flatten(0, 1)[pick]  # noqa: E731
        pair_cond = None if cond is None else cond.repeat_interleave(pairs, dim=0)[pick]
        return flat(xs), theta[:, 1:].flatten()[pick], flat(dxdts), pair_cond
