"""LADD: latent adversarial diffusion distillation (Sauer et al. 2024; SANA-Sprint's `train_scm_ladd.py`, METHODS.md
section 4).

The discriminator is the frozen teacher read at several depths, each feature map scored by a small trainable head
(models/discriminator.py: TeacherFeatureDiscriminator). Real and generated samples are re-noised, each with its own
noise and time, at log-SNR = -2 n with n ~ N(d_p_mean, d_p_std) (SANA-Sprint's arctan(exp(N(-0.6, 1)) / sigma_d) in
TrigFlow, mapped onto the teacher's schedule), and the heads play the hinge game:

    D: 0.5 [relu(1 - D(real)) + relu(1 + D(fake))],   G: -D(fake),

averaged over heads and samples. The generator's gradient flows through the frozen teacher into its sample; only the
heads are trained. `ladd` alone is an objective; `scm` with `adv_weight > 0` adds the same game to sCM (SANA-Sprint).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import parallel
from ..registry import register
from .base import Batch, LossOutput, Objective, Phase
from .terms import frozen, sample_generator


def renoised(obj: Objective, x0: torch.Tensor, p_mean: float, p_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t): x0 noised on the teacher's schedule at log-SNR -2 N(p_mean, p_std), fresh noise per sample."""
    schedule = obj.nets.teacher.schedule
    t = schedule.t_of_logsnr(-2 * (p_mean + p_std * parallel.randn(len(x0)))).float().to(x0.device)
    return schedule.add_noise(x0, parallel.randn_like(x0), t), t


def adversarial_loss(obj: Objective, x0: torch.Tensor, cond: torch.Tensor | None, p_mean: float,
                     p_std: float) -> torch.Tensor:
    """The generator's hinge loss -mean D(x0 re-noised); gradients reach x0 but not the heads."""
    disc = obj.nets.discriminator
    with frozen(disc):
        return -disc(*renoised(obj, x0.float(), p_mean, p_std), cond).mean()


def discriminator_phase(obj: Objective, p_mean: float, p_std: float) -> Phase:
    """The heads' phase: hinge loss on real samples (Batch.x0) against the generator phase's detached samples (fresh
    ones when there are none), with the same conditions."""
    def loss(batch: Batch, samples: torch.Tensor | None) -> LossOutput:
        fake = (samples if samples is not None else sample_generator(obj, batch, grad=False)).detach().float()
        return hinge_loss(obj, batch, fake, p_mean, p_std)

    return Phase("discriminator", loss)


def hinge_loss(obj: Objective, batch: Batch, fake: torch.Tensor, p_mean: float, p_std: float) -> LossOutput:
    if batch.x0 is None:
        raise ValueError("the discriminator needs real samples in Batch.x0")
    disc = obj.nets.discriminator
    real_logits = disc(*renoised(obj, batch.x0.to(fake), p_mean, p_std), batch.cond)
    fake_logits = disc(*renoised(obj, fake, p_mean, p_std), batch.cond)
    loss = 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())
    acc = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
    return LossOutput(loss, {"loss/discriminator": loss.item(), "gan/d_accuracy": acc.item()})


@dataclass
class LADDConfig:
    name: str = "ladd"
    d_p_mean: float = -0.6  # re-noising for the discriminator: log-SNR = -2 N(d_p_mean, d_p_std) (SANA-Sprint)
    d_p_std: float = 1.0


@register("objective", "ladd")
class LADD(Objective):
    """The adversarial game alone: one generator phase and one discriminator phase per iteration."""

    Config = LADDConfig
    needs = frozenset({"teacher", "discriminator", "data"})
    discriminator_on = "teacher"

    def phases(self, step: int) -> list[Phase]:
        return [Phase("generator", self.generator_loss), discriminator_phase(self, self.cfg.d_p_mean,
                                                                             self.cfg.d_p_std)]

    def generator_loss(self, batch: Batch, samples: torch.Tensor | None = None) -> LossOutput:
        x0 = sample_generator(self, batch, grad=True)
        loss = adversarial_loss(self, x0, batch.cond, self.cfg.d_p_mean, self.cfg.d_p_std)
        return LossOutput(loss, {"loss/generator": loss.item()}, samples=x0.detach())
