"""VSD / DMD2 distribution matching.

Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2, 2024), Sec. 3 and eq. (2);
Wang et al., ProlificDreamer (VSD, 2023). The generator's gradient at its sample x0 is the score difference
s_fake - s_real at a noised copy x_t, written as x0_fake - x0_real and normalised per sample by mean|x0 - x0_real|.
It is applied through a pseudo-target, L = 0.5 * mean((x0 - sg(x0 - g))^2), so dL/dx0 = g / numel: no gradient
flows through the teacher or the fake score. The fake score tracks the generator's distribution by denoising score
matching on detached generator samples, `update_ratio` times per generator update (DMD2's TTUR).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..diffusion.schedules import bcast
from ..diffusion.timesteps import uniform_t
from ..registry import register
from .base import Batch, LossOutput, Objective, Phase


@dataclass
class VSDConfig:
    name: str = "vsd"
    guidance_scale: float = 1.0  # classifier-free guidance on the teacher only (DMD2 asserts the fake's is 1)
    update_ratio: int = 5  # fake-score updates per generator update (DMD2: 5 for ImageNet, 10 for SD1.5)
    t_min: float = 0.02  # generator-loss times, DMD2's 20..980 of 1000
    t_max: float = 0.98
    fake_t_min: float = 0.0  # fake-score denoising times
    fake_t_max: float = 1.0


def sample_generator(obj: Objective, batch: Batch, grad: bool) -> torch.Tensor:
    """x0 from the generator. A K-step generator trains one random step k per iteration on inputs made by its own
    first k steps (DMD2's backward simulation); only step k carries gradients."""
    gen = obj.nets.generator
    z = torch.randn(batch.n, *obj.shape)
    k = int(torch.randint(0, gen.steps, ())) if gen.steps > 1 else 0
    x_in = gen.backward_simulate(z, batch.cond, k) if k > 0 else gen.prior(z)
    with torch.set_grad_enabled(grad):
        return gen.step(x_in, k, batch.cond)


def denoising_loss(obj: Objective, batch: Batch, x0: torch.Tensor, t_min: float, t_max: float) -> LossOutput:
    """Denoising score matching of the fake score on detached samples x0, weighted (alpha^2 + sigma^2) / sigma^2 in
    x0 space: on VP schedules exactly the v-prediction MSE a teacher like ours was trained with."""
    fake = obj.nets.fake_score
    t = uniform_t(len(x0), t_min, t_max, fake.schedule)
    x_t = fake.schedule.add_noise(x0, torch.randn_like(x0), t)
    alpha, sigma = fake.schedule.alpha_sigma(t)
    weight = bcast((alpha ** 2 + sigma ** 2) / sigma.clamp_min(1e-4) ** 2, x0)
    loss = (weight * (fake(x_t, t, batch.cond).x0 - x0) ** 2).mean()
    return LossOutput(loss, {"loss/fake_score": loss.item()})


@register("objective", "vsd")
class VSD(Objective):
    Config = VSDConfig
    needs = frozenset({"teacher", "fake_score"})
    trains = ("generator", "fake_score")

    def __init__(self, cfg: VSDConfig, nets, shape: tuple[int, ...]) -> None:
        super().__init__(cfg, nets, shape)
        if cfg.update_ratio < 1:
            raise ValueError(f"objective.update_ratio must be >= 1, got {cfg.update_ratio}")

    def phases(self, step: int) -> list[Phase]:
        fake = Phase("fake_score", self.fake_loss)
        return [Phase("generator", self.generator_loss), fake] if step % self.cfg.update_ratio == 0 else [fake]

    def generator_loss(self, batch: Batch, samples: torch.Tensor | None = None) -> LossOutput:
        cfg, nets = self.cfg, self.nets
        x0 = sample_generator(self, batch, grad=True)
        t = uniform_t(batch.n, cfg.t_min, cfg.t_max, nets.teacher.schedule)
        with torch.no_grad():  # stop-gradient: the update direction is computed, not differentiated (DMD2 eq. 2)
            x_t = nets.teacher.schedule.add_noise(x0, torch.randn_like(x0), t)
            x0_real = nets.teacher.guided(x_t, t, batch.cond, cfg.guidance_scale).x0
            x0_fake = nets.fake_score(x_t, t, batch.cond).x0
            dims = tuple(range(1, x0.ndim))
            norm = (x0.float() - x0_real).abs().mean(dim=dims, keepdim=True)  # DMD2's per-sample normaliser
            grad = torch.nan_to_num((x0_fake - x0_real) / norm)  # a zero normaliser gives inf/nan: zeroed, as in DMD2
        loss = 0.5 * F.mse_loss(x0.float(), (x0.float() - grad).detach())
        logs = {"loss/generator": loss.item(), "vsd/grad_abs": grad.abs().mean().item()}
        return LossOutput(loss, logs, samples=x0.detach())

    def fake_loss(self, batch: Batch, samples: torch.Tensor | None) -> LossOutput:
        if samples is None:  # not a generator iteration: make fresh samples without gradients
            samples = sample_generator(self, batch, grad=False)
        return denoising_loss(self, batch, samples.float(), self.cfg.fake_t_min, self.cfg.fake_t_max)
