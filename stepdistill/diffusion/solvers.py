"""Samplers over the canonical form: deterministic Euler/Heun (probability-flow ODE) and few-step generator rollout.

A `denoise(x_t, t) -> Prediction` callable is all they need. The ODE is integrated in the VE variable x/alpha
against sigma/alpha (as in EDM), which is schedule-independent: for VP, flow and EDM alike, d(x/a)/d(s/a) = eps.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..devices import to_device
from ..errors import InputError
from .parametrization import Prediction
from .schedules import Schedule, bcast

Denoise = Callable[[torch.Tensor, torch.Tensor], Prediction]


def cpu_randn_like(x: torch.Tensor) -> torch.Tensor:
    """Unit Gaussian noise shaped like x, drawn from the CPU stream and moved to x's device (the same numbers on any
    device)."""
    return to_device(torch.randn(x.shape, dtype=x.dtype), x.device)


def ode_times(steps: int, schedule: Schedule, rho: float = 7.0, ve_max: float = 80.0,
              ve_min: float = 0.002, t_max: float = 1.0) -> torch.Tensor:
    """steps+1 canonical times, highest first: the evaluation points of `sample_ode` plus a final 0.

    They are Karras-spaced (EDM, rho=7) in the VE noise level sigma/alpha between ve_min and ve_max = 80. Schedules
    whose t = 1 lies above 80 (VP, flow: infinite at alpha = 0) start at t = 1 and take one DDIM step down to 80.
    `t_max` < 1 starts the ODE there instead (a generator's start time, generator.start_t).
    """
    fine = torch.linspace(t_max, 0.0, 20001, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(fine)
    ve = sigma.double() / alpha.double().clamp_min(1e-12)
    top = float(ve[0])
    n_karras = steps if top <= ve_max * 1.0001 else steps - 1
    hi, lo = min(top, ve_max) ** (1 / rho), max(float(ve[-1]), ve_min) ** (1 / rho)
    targets = (hi + torch.linspace(0, 1, max(n_karras, 1), dtype=torch.float64) * (lo - hi)) ** rho
    idx = torch.searchsorted(-ve, -targets).clamp(0, len(fine) - 1)  # invert the monotone map t -> ve on a fine grid
    karras = fine[idx].float()[:n_karras]
    times = torch.cat([torch.full((steps - n_karras,), t_max), karras, torch.zeros(1)])
    return schedule.snap(times)


@torch.no_grad()
def finite_ve(schedule: Schedule, t: torch.Tensor) -> bool:
    """Whether time t has a finite VE level sigma/alpha (not pure noise), so a Heun correction can start there."""
    alpha, sigma = schedule.alpha_sigma(t.reshape(1))
    return float(sigma[0] / alpha[0].clamp_min(1e-12)) < 1e4


def ode_nfe(steps: int, schedule: Schedule, heun: bool = True) -> int:
    """The number of evaluations sample_ode makes."""
    times = ode_times(steps, schedule)
    return steps + (sum(finite_ve(schedule, times[i]) for i in range(steps - 1)) if heun else 0)


def solver_for_nfe(nfe: int) -> tuple[str, int]:
    """Odd NFE >= 3 -> Heun with (nfe+1)/2 intervals (EDM's 18 -> 35); otherwise Euler with nfe steps (eval.teacher_nfe
    and generator.warm_start_nfe read the same way)."""
    if nfe < 1:
        raise InputError(f"teacher NFE must be >= 1, got {nfe}")
    return ("heun", (nfe + 1) // 2) if nfe >= 3 and nfe % 2 == 1 else ("euler", nfe)


def sample_ode(denoise: Denoise, z: torch.Tensor, schedule: Schedule, steps: int = 18,
               heun: bool = True, t_max: float = 1.0) -> tuple[torch.Tensor, int]:
    """Probability-flow ODE from the prior sample z (already scaled by init_sigma) to x0; returns (x0, NFE).

    Each step is a DDIM step, x' = alpha' x0 + sigma' eps, which is exactly Euler in the VE variable x/alpha against
    sigma/alpha. Heun (EDM's 2nd order) redoes that Euler step in the VE variable with the average eps of both ends;
    it is skipped on the last step and on a step starting where alpha = 0 (pure noise in flow schedules), where the
    VE variable is infinite.
    `steps` Heun intervals thus cost 2*steps - 1 evaluations (18 -> 35 NFE) on VP/EDM schedules.
    `t_max`: the time of z when below 1 (ode_times).
    """
    times = ode_times(steps, schedule, t_max=t_max)
    x, n, nfe = z, len(z), 0
    for i in range(steps):
        t_cur, t_next = times[i].expand(n), times[i + 1].expand(n)
        a_cur, s_cur = schedule.alpha_sigma(t_cur)
        a_next, s_next = schedule.alpha_sigma(t_next)
        pred = denoise(x, t_cur)
        nfe += 1
        if i == steps - 1:
            return pred.x0, nfe
        x_next = bcast(a_next, x) * pred.x0 + bcast(s_next, x) * pred.eps
        if heun and finite_ve(schedule, times[i]):
            pred2 = denoise(x_next, t_next)
            nfe += 1
            y = x / bcast(a_cur, x)  # VE variable: dy / d(sigma/alpha) = eps
            dlam = bcast(s_next / a_next - s_cur / a_cur, x)
            x_next = bcast(a_next, x) * (y + dlam * 0.5 * (pred.eps + pred2.eps))
        x = x_next
    return x, nfe


def rollout(denoise: Denoise, z: torch.Tensor, schedule: Schedule, times: list[float],
            noise: Callable[[torch.Tensor], torch.Tensor] = cpu_randn_like) -> torch.Tensor:
    """Few-step (consistency-style) sampling: x0 = G(x_t1); x_t2 = alpha x0 + sigma * fresh noise; ... (DMD2, LCM).

    `noise(x0)` supplies the fresh noise of each intermediate step, shaped like x0 (default: from the CPU stream;
    models/generator.py passes parallel.randn_like, or noise drawn the way diffusers' LCMScheduler does, which makes
    our samples and an exported pipeline's agree for the same seed).
    """
    x = z
    n = len(z)
    for i, t in enumerate(times):
        x0 = denoise(x, torch.full((n,), t, device=z.device)).x0
        if i + 1 < len(times):
            eps = noise(x0)
            x = schedule.add_noise(x0, eps, torch.full((n,), times[i + 1], device=z.device))
    return x0
