"""Samplers of canonical time t in [0, 1]."""
from __future__ import annotations

import torch

from .. import parallel
from .schedules import Schedule


def uniform_t(n: int, t_min: float, t_max: float, schedule: Schedule,
              device: torch.device | str | None = None) -> torch.Tensor:
    """(n,) times uniform in [t_min, t_max], snapped onto the schedule's grid (0.02..0.98 -> integers 20..980).
    Drawn from the CPU stream; returned on `device` (the samples' device, where the times will meet them)."""
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    t = t_min + (t_max - t_min) * parallel.rand(n, device=device)
    return schedule.snap(t)


def step_times(steps: int, schedule: Schedule) -> list[float]:
    """Canonical times of a K-step generator, highest first: evenly spaced 1, 1 - 1/K, ... (999, 749, 499, 249 for K=4).

    This is the grid diffusers' LCMScheduler produces with `original_inference_steps=K`, so exported schedulers
    reproduce it without a custom `timesteps=` argument.
    """
    if steps < 1:
        raise ValueError(f"a generator needs at least 1 step, got {steps}")
    if schedule.discrete:
        n = schedule.num_steps
        k = n // steps
        return [(tau) / (n - 1) for tau in sorted((i * k - 1 for i in range(1, steps + 1)), reverse=True)]
    return [1.0 - i / steps for i in range(steps)]
