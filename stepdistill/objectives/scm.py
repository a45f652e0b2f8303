"""sCM: continuous-time consistency distillation in TrigFlow (Lu & Song, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", 2024; SANA-Sprint; docs/methods.md).

On real data x0, at theta = atan(exp(N(p_mean, p_std)) / sigma_d) and the TrigFlow state x = cos k x0 + sin sigma_d z
(k = sigma_d in SANA-Sprint's convention `trigflow: sana`, 1 in Lu & Song's pixel convention `trigflow: scm`;
diffusion/trigflow.py), the teacher gives the probability-flow velocity dx/dtheta = sigma_d F_teacher (with
classifier-free guidance). The student's F and its total derivative along that flow, dF = JVP of F(x, theta) with
tangents (cos sin dx/dtheta, cos sin), form

    g = -cos^2 (sigma_d F^- - dx/dtheta) - r (cos sin x + sigma_d dF),    g <- g / (||g|| + c)

(F^- the student's own output without gradient, r = min(1, iteration / tangent_warmup)), and the loss is

    mean[ w / exp(logvar(theta)) * (F - F^- - g)^2 + logvar(theta) ],   w = 1 / (sigma_d tan theta),

with logvar a small learned adaptive weight trained alongside the generator. Every teacher enters through its
TrigFlow velocity; the student stays an ordinary generator whose x0 prediction is the consistency function
(cos x - sin sigma_d F) / k, so it samples, evaluates and exports like every other student.

Reference: NVlabs/Sana `train_scripts/train_scm_ladd.py` (`train`, G phase) computes this loss on latents scaled by
sigma_d, with angles from `compute_density_for_timestep_sampling` (`logit_normal_trigflow`: atan(exp(N) / 0.5)).
Deliberate differences: the angle divides by sigma_data (Lu & Song's form; SANA hard-codes 0.5, its sigma_data);
the student is the teacher's network family seen through diffusion/trigflow.py, as SANA's SanaMSCM is its flow network
seen through the same conversion; logvar is a small module of its own rather than a head of the network;
`trigflow: scm` keeps Lu & Song's unscaled pixel data.

The JVP uses forward-mode AD (`torch.func.jvp`); where a network has an op without a forward-mode rule, `jvp: auto`
falls back to central finite differences (FastGen's fallback) and says so once. Attention inside the JVP runs SDPA's
math backend (memory quadratic in the sequence length), or with `jvp: flash` the Triton kernel of
kernels/jvp_attention.py, which computes attention's output and tangent in one flash-style pass (O(N) memory); where
that kernel cannot run (no CUDA device, no Triton) a warning names the math fallback.

`adv_weight > 0` is SANA-Sprint's sCM + LADD: the generator's loss adds adv_weight x LADD's adversarial loss on the
consistency estimate (or, with probability `adv_largest_time`, on the one-step sample from pure noise, SANA's
`train_largest_timestep`), and a discriminator phase on the frozen teacher's features follows each generator phase
(objectives/ladd.py; d_p_mean, d_p_std mean SANA-Sprint's discriminator times in either convention).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .. import parallel
from ..devices import to_device
from ..diffusion.schedules import bcast
from ..diffusion.trigflow import TrigFlowSpace
from ..errors import RecipeError, SetupError
from ..kernels.forward_ad import forward_ad_ready
from ..models.mlp import TimeFeatures
from ..models.score import drawn_guidance
from ..registry import register
from .base import Batch, LossOutput, Objective, Phase
from .ladd import adversarial_loss, discriminator_phase
from .terms import sample_generator

JVP_MODES = ("auto", "forward", "flash", "finite_difference")


@dataclass
class SCMConfig:
    name: str = "scm"
    sigma_data: float = 0.5  # TrigFlow's sigma_d: the noise scale at theta = pi/2
    trigflow: Literal["sana", "scm"] = "sana"  # sana: data x sigma_data inside TrigFlow (SANA-Sprint, TBCM; for
    #   unit-variance data such as VAE latents), sigma/alpha = tan theta; scm: data as they are (Lu & Song's pixels,
    #   spread ~ sigma_data), sigma/alpha = sigma_data tan theta
    p_mean: float = 0.2  # theta = atan(exp(N(p_mean, p_std)) / sigma_d): SANA-Sprint's (Lu & Song's pixels: -1.0, 1.4
    p_std: float = 1.6  #   with trigflow: scm)
    guidance_scale: float = 1.0  # teacher classifier-free guidance in dx/dtheta (SANA-Sprint: 4 to 5)
    guidance_set: list[float] | None = None  # SANA-Sprint's per-sample scales (e.g. [4.0, 4.5, 5.0]): each sample's
    #   teacher CFG scale is drawn from the set and given to the student as a guidance embedding (text-to-image
    #   teachers; models/score.py embed_guidance); replaces guidance_scale
    eval_guidance: float | None = None  # the scale such a student samples, evaluates and exports at (default: the
    #                                     middle of the sorted set)
    tangent_warmup: int = 4000  # iterations over which r ramps from 0 to 1 (0: no warm-up)
    tangent_norm: float = 0.1  # c in g / (||g|| + c)
    adaptive_weight: bool = True  # learned logvar(theta); off: logvar = 0
    jvp: Literal["auto", "forward", "flash", "finite_difference"] = "auto"  # flash: forward with the Triton
    #   attention kernel (kernels/jvp_attention.py); auto: forward (math attention), finite differences if that fails
    fd_eps: float = 1e-4  # finite-difference step: small, as time embeddings of native DDPM steps vary fast
    adv_weight: float = 0.0  # LADD's weight in the generator loss (SANA-Sprint 0.5); > 0 adds the discriminator
    adv_largest_time: float = 0.5  # share of adversarial passes on the one-step sample from pure noise
    d_p_mean: float = -0.6  # LADD's re-noising, SANA-Sprint's times in either convention (objective ladd)
    d_p_std: float = 1.0


class AdaptiveWeight(nn.Module):
    """logvar(theta): sinusoidal features of theta / (pi/2) and a zero-initialised linear layer."""

    def __init__(self, features: int = 32) -> None:
        super().__init__()
        self.time = TimeFeatures(features, max_freq=100.0)
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return self.linear(self.time(theta.float() / (math.pi / 2))).squeeze(1)


def normalized_tangent(g: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """g / (||g|| + c) per sample (norm over all non-batch dims), and the norms before normalising."""
    norm = g.flatten(1).norm(dim=1)
    return g / bcast(norm + c, g), norm


def central_difference(f, x: torch.Tensor, theta: torch.Tensor, dx: torch.Tensor, dtheta: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """(f(x + eps dx, theta + eps dtheta) - f(x - eps dx, theta - eps dtheta)) / (2 eps), same random stream for
    both sides (networks with dropout see the same mask)."""
    devices = [x.device] if x.is_cuda else []  # dropout draws from the GPU's stream there
    with torch.random.fork_rng(devices=devices):
        plus = f(x + eps * dx, theta + eps * dtheta)
    with torch.random.fork_rng(devices=devices):
        minus = f(x - eps * dx, theta - eps * dtheta)
    return (plus - minus) / (2 * eps)


@register("objective", "scm")
class SCM(Objective):
    multistep = True
    contract_overrides = ("objective.adv_weight=0.5",)
    Config = SCMConfig
    needs = frozenset({"teacher", "data"})
    discriminator_on = "teacher"

    @classmethod
    def needs_for(cls, cfg) -> frozenset[str]:
        return cls.needs | ({"discriminator", "data"} if cfg.adv_weight > 0 else set())

    def __init__(self, cfg: SCMConfig, nets, shape: tuple[int, ...]) -> None:
        if cfg.jvp not in JVP_MODES:
            raise RecipeError(f"unknown objective.jvp {cfg.jvp!r}; choose one of {', '.join(JVP_MODES)}")
        if cfg.sigma_data <= 0 or cfg.tangent_warmup < 0 or cfg.fd_eps <= 0:
            raise RecipeError("objective.sigma_data and objective.fd_eps must be > 0 and objective.tangent_warmup "
                              f">= 0, got {cfg.sigma_data}, {cfg.fd_eps}, {cfg.tangent_warmup}")
        if cfg.guidance_set is not None and type(self).training_points is not SCM.training_points:
            raise RecipeError(f"objective.guidance_set is not supported by objective {cfg.name} yet (its training "
                              "points come from teacher trajectories, not one per sample): use "
                              "objective.guidance_scale")
        super().__init__(cfg, nets, shape)
        self.trig = TrigFlowSpace.of(cfg.trigflow, cfg.sigma_data)
        self.logvar = AdaptiveWeight() if cfg.adaptive_weight else None
        self.jvp_mode = "forward" if cfg.jvp == "auto" else cfg.jvp  # the mode in use: forward, flash or
        #   finite_difference (a failing forward / flash one gives way, once, with a warning)
        self.r = 0.0

    def parameters(self, network: str) -> list[nn.Parameter]:
        return list(self.logvar.parameters()) if network == "generator" and self.logvar is not None else []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.logvar is None else {f"logvar.{k}": v for k, v in self.logvar.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.logvar is None:
            return super().load_state_dict(state)
        self.logvar.load_state_dict({k.removeprefix("logvar."): v for k, v in state.items()})

    def phases(self, step: int) -> list[Phase]:
        warmup = self.cfg.tangent_warmup
        self.r = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if self.cfg.adv_weight > 0:
            return [Phase("generator", self.generator_loss),
                    discriminator_phase(self, self.cfg.d_p_mean, self.cfg.d_p_std)]
        return [Phase("generator", self.generator_loss)]

    # ---- pieces --------------------------------------------------------------------------------------------------
    def sample_theta(self, n: int) -> torch.Tensor:
        c = self.cfg
        return torch.atan(torch.exp(c.p_mean + c.p_std * parallel.randn(n)) / c.sigma_data)

    def training_points(self, batch: Batch):
        """(x, theta, teacher dx/dtheta at (x, theta), conditions): real data noised at sampled angles (TBCM takes
        them from teacher trajectories instead)."""
        sd = self.cfg.sigma_data
        x0 = batch.x0.float()
        theta = self.sample_theta(batch.n)
        x = self.trig.noise(x0, parallel.randn_like(x0), theta)
        with torch.no_grad():
            dxdt = sd * self.trig.velocity(self.nets.teacher, x, theta, batch.cond, self.teacher_guidance())
        return x, theta, dxdt, batch.cond

    def teacher_guidance(self) -> float | torch.Tensor:
        """The teacher's CFG scale in dx/dtheta: guidance_scale, or with guidance_set the per-sample scales the
        student is given for this batch (read from it, so teacher and student always see the same scales)."""
        return self.nets.generator.net.guidance_input if self.cfg.guidance_set else self.cfg.guidance_scale

    def student_velocity(self, x: torch.Tensor, theta: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.trig.velocity(self.nets.generator.net, x, theta, cond)

    def velocity_and_tangent(self, x: torch.Tensor, theta: torch.Tensor, cond: torch.Tensor | None,
                             dx: torch.Tensor, dtheta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F(x, theta), its directional derivative along (dx, dtheta)) of the student, without parameter graphs."""
        def f(x_, theta_):
            return self.student_velocity(x_, theta_, cond)

        if self.jvp_mode == "flash":
            from ..kernels.jvp_attention import kernel_status

            if (reason := kernel_status(x.device)) is not None:
                warnings.warn(f"objective.jvp=flash: {reason}; the JVP's attention runs SDPA's math backend instead "
                              "(forward-mode AD as with objective.jvp=forward: memory quadratic in the sequence "
                              "length)", stacklevel=2)
                self.jvp_mode = "forward"
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # tangents in float32 (FastGen too)
            if self.jvp_mode in ("forward", "flash"):
                try:
                    with forward_ad_ready(self.nets.generator, flash=self.jvp_mode == "flash"):
                        return torch.func.jvp(f, (x, theta), (dx, dtheta))
                except (RuntimeError, NotImplementedError) as e:
                    if self.cfg.jvp in ("forward", "flash"):
                        raise SetupError(f"forward-mode AD (torch.func.jvp) failed on this network: {e}. Set "
                                         "objective.jvp=finite_difference (or auto) to use central finite "
                                         "differences instead.") from e
                    warnings.warn(f"forward-mode AD (torch.func.jvp) is not supported by this network "
                                  f"({str(e).splitlines()[0]}); sCM falls back to central finite differences "
                                  f"(objective.jvp=finite_difference, fd_eps={self.cfg.fd_eps})", stacklevel=2)
                    self.jvp_mode = "finite_difference"
            return f(x, theta), central_difference(f, x, theta, dx, dtheta, self.cfg.fd_eps)

    # ---- loss ------------------------------------------------------------------------------------------------------
    def generator_loss(self, batch: Batch, samples: torch.Tensor | None = None) -> LossOutput:
        with drawn_guidance(self.nets.generator.net, self.cfg.guidance_set, batch.n):  # nothing drawn when unset
            return self._generator_loss(batch)

    def _generator_loss(self, batch: Batch) -> LossOutput:
        cfg, sd = self.cfg, self.cfg.sigma_data
        x, theta, dxdt, cond = self.training_points(batch)
        theta = to_device(theta, x.device)  # drawn on the CPU; the adaptive weight and the loss terms compute beside x
        cos, sin = bcast(theta.cos(), x), bcast(theta.sin(), x)
        f_minus, df = self.velocity_and_tangent(x, theta, cond, cos * sin * dxdt, theta.cos() * theta.sin())
        g = -cos ** 2 * (sd * f_minus - dxdt) - self.r * (cos * sin * x + sd * df)
        g, g_norm = normalized_tangent(g, cfg.tangent_norm)
        f = self.student_velocity(x, theta, cond)
        # F^- is F without gradient. Under bf16 autocast f carries bf16 rounding that the float32 JVP primal f_minus
        # does not, and on latent-size inputs their difference is as large as g: take F^- from this same pass then
        f_stop = f.detach() if torch.is_autocast_enabled(x.device.type) else f_minus
        weight = 1.0 / (sd * torch.tan(theta))
        logvar = self.logvar(theta) if self.logvar is not None else torch.zeros_like(theta)
        per_element = bcast(weight / logvar.exp(), f) * (f - f_stop - g.detach()) ** 2 + bcast(logvar, f)
        loss = per_element.mean()
        logs = {"loss/generator": loss.detach(), "scm/tangent_norm": g_norm.mean().detach(), "scm/r": self.r,
                "scm/logvar": logvar.mean().detach()}
        if cfg.adv_weight <= 0:
            return LossOutput(loss, logs)
        if float(torch.rand(())) < cfg.adv_largest_time:
            x0_adv = sample_generator(self, batch, grad=True)
        else:  # the consistency estimate at the sampled angle
            x0_adv = self.trig.x0(x, f, theta)
        adv = adversarial_loss(self, x0_adv, cond, cfg.d_p_mean, cfg.d_p_std)
        logs.update({"loss/scm": loss.detach(), "loss/generator_adv": adv.detach()})
        loss = loss + cfg.adv_weight * adv
        logs["loss/generator"] = loss.detach()
        return LossOutput(loss, logs, samples=x0_adv.detach())
