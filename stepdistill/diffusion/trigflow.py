"""TrigFlow view of any teacher (sCM: Lu & Song 2024; SANA-Sprint 2025).

TrigFlow writes a noisy sample as x = cos(theta) x0 + sin(theta) sigma_d eps, theta in [0, pi/2], and a network as
the velocity F with dx/dtheta = sigma_d F, so x0 = cos(theta) x - sin(theta) sigma_d F. Any teacher converts without
training by matching signal-to-noise ratios: the canonical time t with alpha_t / sigma_t = cos / (sigma_d sin) sees
the same sample scaled by c = alpha_t / cos = sigma_t / (sigma_d sin), and from its canonical (x0, eps)

    F = cos(theta) eps - sin(theta) x0 / sigma_d.

This is SANA-Sprint's flow-matching conversion and FastGen's SNR matching, written once for every schedule (eps, v,
x0 and flow predictions all arrive here as (x0, eps)). The consistency function x0 = cos x - sin sigma_d F equals the
network's canonical x0 prediction, so a TrigFlow-trained student samples with the ordinary generator rule.
"""
from __future__ import annotations

import math

import torch

from .schedules import Schedule, bcast


def trigflow_time(schedule: Schedule, theta: torch.Tensor, sigma_d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) TrigFlow angles -> (canonical t of `schedule` with the same SNR (N,), input scale c (N,)), both float32."""
    theta = theta.double().clamp(0, math.pi / 2)  # float32(pi/2) lies above pi/2, where cos < 0
    cos, sin = theta.cos(), theta.sin()
    log_snr = 2 * (torch.log(cos) - torch.log(sigma_d * sin))
    t = schedule.t_of_logsnr(log_snr)
    alpha, sigma = schedule.alpha_sigma(t)
    # the ratio of norms equals alpha/cos and sigma/(sigma_d sin) and stays finite at both ends
    scale = torch.sqrt(alpha.double() ** 2 + sigma.double() ** 2) / torch.sqrt(cos ** 2 + (sigma_d * sin) ** 2)
    return t.float(), scale.float()


def trigflow_velocity(score, x: torch.Tensor, theta: torch.Tensor, cond: torch.Tensor | None, sigma_d: float,
                      guidance_scale: float = 1.0) -> torch.Tensor:
    """F(x, theta) of a ScoreModel (teacher or student) at TrigFlow state x (N, ...) and angles theta (N,)."""
    t, c = trigflow_time(score.schedule, theta, sigma_d)
    pred = score.guided(bcast(c, x) * x, t, cond, guidance_scale)
    theta = theta.float()
    return bcast(theta.cos(), x) * pred.eps - bcast(theta.sin(), x) * pred.x0 / sigma_d


def trigflow_noise(x0: torch.Tensor, noise: torch.Tensor, theta: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """x = cos(theta) x0 + sin(theta) sigma_d noise, with unit Gaussian `noise`."""
    theta = theta.float()
    return bcast(theta.cos(), x0) * x0 + bcast(theta.sin(), x0) * sigma_d * noise
