"""The student: a ScoreModel used as a one- or few-step generator."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import parallel
from ..diffusion.solvers import rollout
from ..diffusion.timesteps import step_times
from .score import ScoreModel


class Generator(nn.Module):
    """G(z, cond) = x0 after K steps: predict x0 at t_1 = 1 from the prior sample, re-noise to t_2 with fresh noise,
    predict again, ... (DMD2's multi-step generator; the same rule as diffusers' LCMScheduler)."""

    def __init__(self, net: ScoreModel, steps: int = 1) -> None:
        super().__init__()
        self.net, self.steps = net, steps
        self.times = step_times(steps, net.schedule)

    @property
    def schedule(self):
        return self.net.schedule

    def prior(self, z: torch.Tensor) -> torch.Tensor:
        """Scale unit Gaussian noise to the schedule's t = 1 distribution (diffusers' init_noise_sigma)."""
        return z * self.schedule.init_sigma

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None, steps: int | None = None,
                noise: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """(N, ...) unit noise -> (N, ...) samples using the first `steps` of the trained times (default: all K)."""
        times = self.times if steps is None else step_times(steps, self.schedule)
        return rollout(lambda x, t: self.net(x, t, cond), self.prior(z), self.schedule, times, noise)

    def _times(self, steps: int | None) -> list[float]:
        return self.times if steps is None or steps == self.steps else step_times(steps, self.schedule)

    def step(self, x_t: torch.Tensor, k: int, cond: torch.Tensor | None = None,
             steps: int | None = None) -> torch.Tensor:
        """x0 predicted by step k (0-based) from x_t at that step's time (of the `steps`-step grid, default the
        trained K); differentiable."""
        t = torch.full((len(x_t),), self._times(steps)[k], device=x_t.device)
        return self.net(x_t, t, cond).x0

    @torch.no_grad()
    def backward_simulate(self, z: torch.Tensor, cond: torch.Tensor | None, k: int,
                          steps: int | None = None) -> torch.Tensor:
        """x_t at step k reached by running the generator's own first k steps from z without gradients (DMD2's
        backward simulation: train each step on inputs the generator itself produces, not on noised data)."""
        times = self._times(steps)
        x = self.prior(z)
        for i in range(k):
            x0 = self.step(x, i, cond, steps)
            x = self.schedule.add_noise(x0, parallel.randn_like(x0), torch.full((len(z),), times[i + 1]))
        return x
