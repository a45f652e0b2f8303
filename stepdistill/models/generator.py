"""The student: a ScoreModel used as a one- or few-step generator."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import parallel
from ..diffusion.solvers import rollout
from ..diffusion.timesteps import step_times
from ..errors import RecipeError
from .score import ScoreModel

START_NOISE = ("pure", "schedule")


def fresh_noise(noise: Callable[[], torch.Tensor] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """rollout's noise function for a generator's `noise` argument: that callable's tensors when given, else this
    process's rows of the global batch's noise (parallel.randn_like)."""
    if noise is None:
        return parallel.randn_like
    return lambda x0: noise()


class Generator(nn.Module):
    """G(z, cond) = x0 after K steps: predict x0 at the first time t_1 from the prior sample, re-noise to t_2 with fresh
    noise, predict again, ... (DMD2's multi-step generator; the same rule as diffusers' LCMScheduler).

    `start_t` (generator.start_t) is t_1, the time the first step is conditioned on; the K times follow
    `step_times(K, schedule, start_t)`. `start_noise` (generator.start_noise) is the first step's input: `pure`, the
    schedule's t = 1 noise z * init_sigma whatever t_1 is (the default; DMD2's SDXL one-step student at 399), or
    `schedule`, the noise of the schedule at t_1, add_noise(0, z, t_1) = sigma(t_1) z (SiD's 2.5 z at sigma 2.5,
    SiD-LSG's sqrt(1 - alphabar_625) z)."""

    def __init__(self, net: ScoreModel, steps: int = 1, start_t: float = 1.0, start_noise: str = "pure") -> None:
        super().__init__()
        if start_noise not in START_NOISE:
            raise RecipeError(f"generator.start_noise must be one of {', '.join(START_NOISE)}, got {start_noise!r}")
        self.net, self.steps, self.start_t, self.start_noise = net, steps, start_t, start_noise
        self.times = step_times(steps, net.schedule, start_t)

    @classmethod
    def from_config(cls, net: ScoreModel, cfg) -> Generator:
        """The generator a recipe's `generator` section (GeneratorConfig) describes, around `net`."""
        return cls(net, cfg.steps, start_t=cfg.start_t, start_noise=cfg.start_noise)

    @property
    def schedule(self):
        return self.net.schedule

    def prior(self, z: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Unit Gaussian noise -> the first step's input (of the `steps`-step grid, default the trained K): z scaled by
        init_sigma (start_noise pure: diffusers' init_noise_sigma) or by sigma at the first time (schedule)."""
        if self.start_noise == "pure":
            return z * self.schedule.init_sigma
        _, sigma = self.schedule.alpha_sigma(torch.tensor([self.times_for(steps)[0]]))
        return z * float(sigma[0])

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None, steps: int | None = None,
                noise: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """(N, ...) unit noise -> (N, ...) samples using the `steps`-step grid from start_t (default: the trained K)."""
        return rollout(lambda x, t: self.net(x, t, cond), self.prior(z, steps), self.schedule, self.times_for(steps),
                       fresh_noise(noise))

    def times_for(self, steps: int | None) -> list[float]:
        """The times of the `steps`-step grid from start_t (None: the trained K)."""
        return self.times if steps is None or steps == self.steps else step_times(steps, self.schedule, self.start_t)

    def step(self, x_t: torch.Tensor, k: int, cond: torch.Tensor | None = None,
             steps: int | None = None) -> torch.Tensor:
        """x0 predicted by step k (0-based) from x_t at that step's time (of the `steps`-step grid, default the
        trained K); differentiable."""
        t = torch.full((len(x_t),), self.times_for(steps)[k], device=x_t.device)
        return self.net(x_t, t, cond).x0

    @torch.no_grad()
    def backward_simulate(self, z: torch.Tensor, cond: torch.Tensor | None, k: int,
                          steps: int | None = None) -> torch.Tensor:
        """x_t at step k reached by running the generator's own first k steps from z without gradients (DMD2's
        backward simulation: train each step on inputs the generator itself produces, not on noised data)."""
        times = self.times_for(steps)
        x = self.prior(z, steps)
        for i in range(k):
            x0 = self.step(x, i, cond, steps)
            x = self.schedule.add_noise(x0, parallel.randn_like(x0), torch.full((len(z),), times[i + 1]))
        return x
