"""TrigFlow view of any teacher (sCM: Lu & Song 2024; SANA-Sprint 2025; docs/methods.md).

TrigFlow's state is x = cos(theta) k x0 + sin(theta) sigma_d eps, theta in [0, pi/2], where k scales the data so
that its spread matches sigma_d, and a network is the velocity F with dx/dtheta = sigma_d F. The two papers differ
in k, so the objectives name their convention (`objective.trigflow`):

- `sana` (SANA-Sprint, TBCM): k = sigma_d. Their data are unit-variance VAE latents that the training script
  multiplies by sigma_d (`clean_images = z * sigma_data`), so the noise-to-signal ratio is sigma/alpha = tan(theta)
  whatever sigma_d, and theta = pi/4 is flow time 1/2.
- `scm` (Lu & Song's pixel models): k = 1. Pixels in [-1, 1] already have a spread of about sigma_d = 0.5 and enter
  unscaled, so sigma/alpha = sigma_d tan(theta) (theta = pi/4 is flow time 1/3 at sigma_d = 0.5).

Both draw training angles as tan(theta) = exp(N(p_mean, p_std)) / sigma_d: exp(N) is the noise level of the state's
data part (EDM's sigma), and p_mean, p_std mean that in either convention.

Any teacher converts without training by matching signal-to-noise ratios: the canonical time t with
alpha_t / sigma_t = k cos / (sigma_d sin) sees the state scaled by c = alpha_t / (k cos) = sigma_t / (sigma_d sin),
and from its canonical (x0, eps)

    F = cos(theta) eps - sin(theta) k x0 / sigma_d,   x0 = (cos(theta) x - sin(theta) sigma_d F) / k.

The second line is the consistency function, equal to the network's canonical x0 prediction, so a TrigFlow-trained
student samples with the ordinary generator rule. Reference: NVlabs/Sana `diffusion/model/nets/sana_multi_scale.py`
`SanaMSCM.forward` converts a flow-matching network with s = sin / (sin + cos), input x sqrt(s^2 + (1-s)^2) at flow
time s and F = [(1 - 2s) x_s + (1 - 2s + 2s^2) v] / sqrt(s^2 + (1-s)^2); this is that formula (for `sana`) written
once for every schedule (eps, v, x0 and flow predictions all arrive here as (x0, eps)), as FastGen's SNR matching does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..devices import to_device
from ..errors import InputError
from .schedules import Schedule, bcast

CONVENTIONS = ("sana", "scm")


@dataclass(frozen=True)
class TrigFlowSpace:
    """TrigFlow with noise scale `sigma_d` on data scaled by `data_scale` (k above)."""

    sigma_d: float
    data_scale: float

    @classmethod
    def of(cls, convention: str, sigma_d: float) -> TrigFlowSpace:
        if convention not in CONVENTIONS:
            raise InputError(f"unknown TrigFlow convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
        return cls(sigma_d, sigma_d if convention == "sana" else 1.0)

    def theta_of_ratio(self, ratio: torch.Tensor) -> torch.Tensor:
        """Noise-to-signal ratios sigma/alpha of the data (N,) -> angles, float64."""
        return torch.atan2(ratio.double() * self.data_scale, torch.tensor(self.sigma_d, dtype=torch.float64))

    def time(self, schedule: Schedule, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) angles -> (canonical t of `schedule` with the same SNR (N,), input scale c (N,)), both float32."""
        theta = theta.double().clamp(0, math.pi / 2)  # float32(pi/2) lies above pi/2, where cos < 0
        signal, noise = self.data_scale * theta.cos(), self.sigma_d * theta.sin()
        t = schedule.t_of_logsnr(2 * (torch.log(signal) - torch.log(noise)))
        alpha, sigma = schedule.alpha_sigma(t)
        # the ratio of norms equals alpha/signal and sigma/noise and stays finite at both ends
        scale = torch.sqrt(alpha.double() ** 2 + sigma.double() ** 2) / torch.sqrt(signal ** 2 + noise ** 2)
        return t.float(), scale.float()

    def velocity(self, score, x: torch.Tensor, theta: torch.Tensor, cond: torch.Tensor | None,
                 guidance_scale: float = 1.0) -> torch.Tensor:
        """F(x, theta) of a ScoreModel (teacher or student) at TrigFlow state x (N, ...) and angles theta (N,)."""
        t, c = self.time(score.schedule, theta)
        pred = score.guided(bcast(c, x) * x, t, cond, guidance_scale)
        theta = theta.float()
        return (bcast(theta.cos(), x) * pred.eps
                - bcast(theta.sin(), x) * (self.data_scale / self.sigma_d) * pred.x0)

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The state cos(theta) k x0 + sin(theta) sigma_d eps, with unit Gaussian `eps`."""
        theta = theta.float()
        return bcast(theta.cos(), x0) * self.data_scale * x0 + bcast(theta.sin(), x0) * self.sigma_d * eps

    def x0(self, x: torch.Tensor, f: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The consistency function (cos(theta) x - sin(theta) sigma_d F) / k: the data the state x denoises to."""
        theta = to_device(theta, x.device)
        return (bcast(theta.cos(), x) * x - bcast(theta.sin(), x) * self.sigma_d * f) / self.data_scale
