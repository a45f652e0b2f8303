"""VSD / DMD2 distribution matching, with DMD2's GAN term and SNOOPI's random guidance.

Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2, 2024), Sec. 3 and eq. (2);
Wang et al., ProlificDreamer (VSD, 2023). The generator's gradient at its sample x0 is the score difference
s_fake - s_real at a noised copy x_t, written as x0_fake - x0_real and normalised per sample by mean|x0 - x0_real|.
It is applied through a pseudo-target, L = 0.5 * mean((x0 - sg(x0 - g))^2), so dL/dx0 = g / numel: no gradient
flows through the teacher or the fake score. The fake score tracks the generator's distribution by denoising score
matching on detached generator samples, `update_ratio` times per generator update (DMD2's TTUR).

`gan_weight` > 0 adds DMD2's adversarial term: a head on the fake score's bottleneck classifies noised real vs
generated samples (its loss, times `gan_d_weight`, joins the fake score's; it needs real data) and the generator
gets `gan_weight * softplus(-D(x_t))` through the same fake-score pass. `guidance_range` turns on SNOOPI's PG-SB:
each iteration draws one guidance scale, applied to the teacher and the fake score alike (the fake then learns its
unconditional prediction too, from `cond_dropout` of its training batches).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import parallel
from ..diffusion.timesteps import uniform_t
from ..models.discriminator import discriminate
from ..models.score import ScoreModel
from ..registry import register
from .base import Batch, LossOutput, Objective, Phase
from .terms import denoising_loss, fake_phase, frozen, plus_discriminator_loss, sample_generator


@dataclass
class VSDConfig:
    name: str = "vsd"
    guidance_scale: float = 1.0  # classifier-free guidance on the teacher only (DMD2 asserts the fake's is 1)
    update_ratio: int = 5  # fake-score updates per generator update (DMD2: 5 for ImageNet, 10 for SD1.5)
    t_min: float = 0.02  # generator-loss times, DMD2's 20..980 of 1000
    t_max: float = 0.98
    fake_t_min: float = 0.0  # fake-score denoising times
    fake_t_max: float = 1.0
    gan_weight: float = 0.0  # DMD2's generator adversarial weight (ImageNet 3e-3, SD1.5 1e-3); > 0 needs real data
    gan_d_weight: float = 1e-2  # weight of the discriminator's loss added to the fake score's (DMD2: 1e-2)
    guidance_range: list[float] | None = None  # SNOOPI PG-SB: per-iteration scale ~ U[lo, hi] for teacher and fake
    cond_dropout: float = 0.1  # share of fake-score training batches made unconditional when the fake is guided


@register("objective", "vsd")
class VSD(Objective):
    Config = VSDConfig
    needs = frozenset({"teacher", "fake_score"})

    @classmethod
    def needs_for(cls, cfg) -> frozenset[str]:
        return cls.needs | ({"discriminator", "data"} if cfg.gan_weight > 0 else set())

    def __init__(self, cfg: VSDConfig, nets, shape: tuple[int, ...]) -> None:
        super().__init__(cfg, nets, shape)
        if cfg.update_ratio < 1:
            raise ValueError(f"objective.update_ratio must be >= 1, got {cfg.update_ratio}")
        if cfg.guidance_range is not None and (len(cfg.guidance_range) != 2 or
                                               cfg.guidance_range[0] > cfg.guidance_range[1]):
            raise ValueError(f"objective.guidance_range must be [low, high] with low <= high, got {cfg.guidance_range}")
        self.scales = (cfg.guidance_scale, 1.0)  # (teacher, fake score) guidance of the current iteration

    def phases(self, step: int) -> list[Phase]:
        if self.cfg.guidance_range is not None:  # one draw per iteration, shared by its phases
            lo, hi = self.cfg.guidance_range
            s = lo + (hi - lo) * float(torch.rand(()))
            self.scales = (s, s)
        fake = fake_phase(self, self.fake_loss)
        return [Phase("generator", self.generator_loss), fake] if step % self.cfg.update_ratio == 0 else [fake]

    # ---- hooks for subclasses --------------------------------------------------------------------------------
    def target(self) -> ScoreModel:
        """The score the generator is pulled toward (DisBack walks this back along a path to the teacher)."""
        return self.nets.teacher

    def weight(self, logits: torch.Tensor | None) -> torch.Tensor | None:
        """Per-sample weight of the distribution-matching direction (f-distill's h(r)); None means 1."""
        return None

    def gan_pair(self, batch: Batch, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(fake, real) samples the discriminator separates: generated vs real data here (ASD: n vs n+1 steps)."""
        return samples, batch.x0

    # ---- losses ------------------------------------------------------------------------------------------------
    def generator_loss(self, batch: Batch, samples: torch.Tensor | None = None) -> LossOutput:
        cfg, nets = self.cfg, self.nets
        real_scale, fake_scale = self.scales
        x0 = sample_generator(self, batch, grad=True)
        t = uniform_t(batch.n, cfg.t_min, cfg.t_max, nets.teacher.schedule, x0.device)
        x_t = nets.teacher.schedule.add_noise(x0, parallel.randn_like(x0), t)
        logits, x0_fake = None, None
        if nets.discriminator is not None:  # one fake-score pass gives both its prediction and D's logits
            # differentiated only for the GAN term (a graph no backward uses would also leave a sharded network
            # waiting for its backward)
            with frozen(nets.fake_score, nets.discriminator), torch.set_grad_enabled(cfg.gan_weight > 0):
                pred, logits = discriminate(nets.fake_score, nets.discriminator, x_t, t, batch.cond)
            x0_fake = pred.x0.detach() if fake_scale == 1.0 else None
        with torch.no_grad():  # stop-gradient: the update direction is computed, not differentiated (DMD2 eq. 2)
            x_t_ = x_t.detach()
            x0_real = self.target().guided(x_t_, t, batch.cond, real_scale).x0
            if x0_fake is None:
                x0_fake = nets.fake_score.guided(x_t_, t, batch.cond, fake_scale).x0
            dims = tuple(range(1, x0.ndim))
            norm = (x0.detach().float() - x0_real).abs().mean(dim=dims, keepdim=True)  # DMD2's per-sample normaliser
            grad = (x0_fake - x0_real) / norm
            w = self.weight(None if logits is None else logits.detach())
            if w is not None:
                grad = grad * w.reshape(-1, *[1] * (x0.ndim - 1))
            grad = torch.nan_to_num(grad)  # a zero normaliser gives inf/nan: zeroed, as in DMD2
        loss = 0.5 * F.mse_loss(x0.float(), (x0.float() - grad).detach())
        logs = {"loss/generator": loss.item(), "vsd/grad_abs": grad.abs().mean().item()}
        if logits is not None and cfg.gan_weight > 0:
            adv = F.softplus(-logits).mean()
            loss = loss + cfg.gan_weight * adv
            logs["loss/generator_adv"] = adv.item()
        return LossOutput(loss, logs, samples=x0.detach())

    def fake_loss(self, batch: Batch, samples: torch.Tensor | None) -> LossOutput:
        if samples is None:  # not a generator iteration: make fresh samples without gradients
            samples = sample_generator(self, batch, grad=False)
        samples = samples.float()
        # the fake score fits its plain prediction, guided or not: under PG-SB it is guided only where the generator's
        # gradient reads it (SwiftBrush's LoRA loss), and learns its unconditional branch from the dropped conditions
        guided = self.scales[1] != 1.0
        out = denoising_loss(self, batch, samples, self.cfg.fake_t_min, self.cfg.fake_t_max, 1.0,
                             self.cfg.cond_dropout if guided else 0.0)
        if self.nets.discriminator is None:
            return out
        fake, real = self.gan_pair(batch, samples)
        return plus_discriminator_loss(self, batch, fake, out, self.cfg.gan_d_weight, self.cfg.t_min, self.cfg.t_max,
                                       real)
