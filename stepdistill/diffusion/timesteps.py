"""Samplers of canonical time t in [0, 1]."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..devices import to_device
from ..errors import RecipeError
from .schedules import Schedule


def cpu_rand(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """torch.rand(n) from the CPU stream, moved to `device`: the same numbers on any device."""
    return to_device(torch.rand(n), device)


def uniform_t(n: int, t_min: float, t_max: float, schedule: Schedule,
              device: torch.device | str | None = None,
              rand: Callable[..., torch.Tensor] = cpu_rand) -> torch.Tensor:
    """(n,) times uniform in [t_min, t_max], snapped onto the schedule's grid (0.02..0.98 -> integers 20..980).
    `rand(n, device=device)` draws the (n,) uniforms on `device` (the samples' device, where the times will meet
    them): by default from the CPU stream; the training code passes parallel.rand, which draws this process's rows
    of the global batch the same way (one process: the same numbers)."""
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    t = t_min + (t_max - t_min) * rand(n, device=device)
    return schedule.snap(t)


def step_times(steps: int, schedule: Schedule, start: float = 1.0) -> list[float]:
    """Canonical times of a K-step generator whose first step runs at `start` (generator.start_t), highest first.

    Continuous schedules: start * (1 - i/K) (SiD-DiT's t_init (1 - i/K); 1, .75, .5, .25 for K=4 from 1).
    Discrete (DDPM) schedules with N timesteps: LCMScheduler's grid over the first D = round(start * N) timesteps,
    (K - i) * (D // K) - 1: 999, 749, 499, 249 for K=4 from 1; 399 for K=1 from 0.4 (DMD2's conditioning timestep);
    625 from 0.626 (SiD-LSG's t_init). It is the grid diffusers' LCMScheduler gives with `original_inference_steps=K`
    on D training timesteps, so exported schedulers reproduce it without a custom `timesteps=` argument.
    """
    if steps < 1:
        raise RecipeError(f"a generator needs at least 1 step, got {steps}")
    if not 0.0 < start <= 1.0:
        raise RecipeError(f"generator.start_t must be in (0, 1] (canonical time of the first step), got {start}")
    if schedule.discrete:
        n = schedule.num_steps
        d = round(start * n)
        if d < steps:
            raise RecipeError(f"generator.start_t={start} leaves {d} of the teacher's {n} timesteps, too few for "
                              f"{steps} steps: raise generator.start_t to at least {steps / n:g}")
        k = d // steps
        return [((steps - i) * k - 1) / (n - 1) for i in range(steps)]
    return [start * (1.0 - i / steps) for i in range(steps)]
