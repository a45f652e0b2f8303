"""Noise schedules behind one canonical time t in [0, 1] (t = 1 is pure noise).

Every schedule defines x_t = alpha(t) * x0 + sigma(t) * eps and maps t to the timestep its network was trained
with (`native`). Objectives only ever see t, alpha and sigma, so they work unchanged on every teacher.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..devices import to_device
from ..errors import InputError


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) to broadcast against a (N, ...) tensor, on its device (a host tensor goes up without
    making the host wait: devices.to_device)."""
    return to_device(v.reshape(-1, *([1] * (like.ndim - 1))), like.device).to(like.dtype)


class Schedule(ABC):
    name: str
    init_sigma: float = 1.0  # scale of the prior sample at t = 1 (diffusers' `init_noise_sigma`)
    discrete: bool = False

    @abstractmethod
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) canonical t -> (alpha (N,), sigma (N,)) in float32."""

    @abstractmethod
    def native(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) canonical t -> the timestep the network expects."""

    @abstractmethod
    def t_of_logsnr(self, log_snr: torch.Tensor) -> torch.Tensor:
        """(N,) log(alpha^2 / sigma^2) -> the canonical t with that signal-to-noise ratio (clamped to [0, 1]); the
        inverse of alpha_sigma, differentiable in log_snr (TrigFlow conversion and its JVP use it)."""

    def snap(self, t: torch.Tensor) -> torch.Tensor:
        """Round t onto the times the network was trained at (identity for continuous schedules)."""
        return t

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps for (N, ...) x0/eps and (N,) t."""
        alpha, sigma = self.alpha_sigma(t)
        return bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps

    def to_config(self) -> dict:
        return {"name": self.name}


class VPDiscrete(Schedule):
    """Variance preserving, discrete (DDPM): alpha^2 = alphas_cumprod[tau], sigma^2 = 1 - alpha^2, tau = t * (T - 1).

    Between integer timesteps alphas_cumprod is interpolated linearly in log-SNR, so continuous t stays well defined;
    `snap` rounds to integers, which is what DDPM-trained networks saw.
    """

    name = "vp"
    discrete = True

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or len(ac) < 2 or not ((ac > 0) & (ac < 1)).all():
            raise InputError("alphas_cumprod must be a 1-D tensor of values in (0, 1)")
        self.alphas_cumprod = ac
        self.log_snr = torch.log(ac) - torch.log1p(-ac)
        self.num_steps = len(ac)
        self._tables = {self.log_snr.device: self.log_snr}  # the log-SNR table on each device times were seen on
        self._range = float(self.log_snr.min()), float(self.log_snr.max())  # read here, not from a GPU's copy

    def _log_snr(self, device: torch.device) -> torch.Tensor:
        if device not in self._tables:
            self._tables[device] = to_device(self.log_snr, device)
        return self._tables[device]

    @classmethod
    def from_diffusers(cls, scheduler) -> VPDiscrete:
        """From any diffusers scheduler that has `alphas_cumprod` (DDPM, DDIM, LCM, Euler, ...)."""
        return cls(scheduler.alphas_cumprod)

    def native(self, t: torch.Tensor) -> torch.Tensor:
        return t.double() * (self.num_steps - 1)

    def snap(self, t: torch.Tensor) -> torch.Tensor:
        return torch.round(t.double() * (self.num_steps - 1)).div(self.num_steps - 1).to(t.dtype)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tau = self.native(t).clamp(0, self.num_steps - 1)
        lo = tau.floor().long().clamp(max=self.num_steps - 2)
        w = tau - lo
        table = self._log_snr(t.device)
        log_snr = torch.lerp(table[lo], table[lo + 1], w)
        alpha2 = torch.sigmoid(log_snr)
        return alpha2.sqrt().float(), (1 - alpha2).sqrt().float()

    def t_of_logsnr(self, log_snr: torch.Tensor) -> torch.Tensor:
        table = self._log_snr(log_snr.device).flip(0)  # increasing in log-SNR; position p is timestep T - 1 - p
        lam = log_snr.double().clamp(*self._range)
        hi = torch.searchsorted(table, lam.detach()).clamp(1, self.num_steps - 1)
        w = (lam - table[hi - 1]) / (table[hi] - table[hi - 1])  # linear in log-SNR, as alpha_sigma interpolates
        return ((self.num_steps - 1) - (hi - 1 + w)) / (self.num_steps - 1)

    def to_config(self) -> dict:
        return {"name": self.name, "num_steps": self.num_steps}


class EDM(Schedule):
    """Variance exploding (EDM): alpha = 1, sigma(t) = (smin^(1/rho) + t (smax^(1/rho) - smin^(1/rho)))^rho.

    The native timestep is sigma itself; EDM's c_noise = ln(sigma)/4 belongs to the network's preconditioning.
    """

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> None:
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.init_sigma = sigma_max

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + t.double() * (hi - lo)) ** self.rho

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sigma(t)
        return torch.ones_like(s).float(), s.float()

    def native(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma(t)

    def t_of_logsnr(self, log_snr: torch.Tensor) -> torch.Tensor:
        sigma = torch.exp(-0.5 * log_snr.double()).clamp(self.sigma_min, self.sigma_max)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (sigma ** (1 / self.rho) - lo) / (hi - lo)

    def to_config(self) -> dict:
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho}


class RectifiedFlow(Schedule):
    """Rectified flow (SD3, FLUX, SANA): x_t = (1 - t) x0 + t eps; native timestep = t * 1000 as in diffusers."""

    name = "flow"

    def __init__(self, native_scale: float = 1000.0) -> None:
        self.native_scale = native_scale

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.float()
        return 1 - t, t

    def native(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.native_scale

    def t_of_logsnr(self, log_snr: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-0.5 * log_snr.double())  # (1 - t) / t = exp(log_snr / 2)


class TrigFlow(Schedule):
    """TrigFlow (sCM): x = cos(theta) x0 + sin(theta) z with z ~ N(0, sigma_d^2), theta = t * pi / 2.

    In eps terms sigma(t) = sigma_d sin(theta); the native timestep is theta.
    """

    name = "trigflow"

    def __init__(self, sigma_data: float = 0.5) -> None:
        self.sigma_data = sigma_data
        self.init_sigma = sigma_data

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = t.double() * (math.pi / 2)
        return theta.cos().float(), (self.sigma_data * theta.sin()).float()

    def native(self, t: torch.Tensor) -> torch.Tensor:
        return t * (math.pi / 2)

    def t_of_logsnr(self, log_snr: torch.Tensor) -> torch.Tensor:
        return torch.atan(torch.exp(-0.5 * log_snr.double()) / self.sigma_data) / (math.pi / 2)


SCHEDULES = {"vp": VPDiscrete, "edm": EDM, "flow": RectifiedFlow, "trigflow": TrigFlow}
