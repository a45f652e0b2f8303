"""LADD: latent adversarial diffusion distillation (Sauer et al. 2024; SANA-Sprint; docs/methods.md).

The discriminator is the frozen teacher read at several depths, each feature map scored by a small trainable head
(models/discriminator.py: TeacherFeatureDiscriminator). Real and generated samples are re-noised, each with its own
noise and time, at SANA-Sprint's discriminator times theta = atan(exp(n) / 0.5), n ~ N(d_p_mean, d_p_std), in its
TrigFlow on data scaled by sigma_d (diffusion/trigflow.py, `sana`), where the noise-to-signal ratio is tan(theta):
the teacher's schedule re-noises at sigma/alpha = exp(n) / 0.5, log-SNR = -2 (n - log 0.5). At SANA's d_p_mean = -0.6
the median is sigma/alpha = 1.10, flow time 0.523 (not exp(-0.6) = 0.55, flow time 0.354, as log-SNR = -2 n gave).
The heads play the hinge game:

    D: 0.5 [relu(1 - D(real)) + relu(1 + D(fake))],   G: -D(fake),

averaged over heads and samples. The generator's gradient flows through the frozen teacher into its sample; only the
heads are trained. `ladd` alone is an objective; `scm` with `adv_weight > 0` adds the same game to sCM (SANA-Sprint).

Reference: NVlabs/Sana `train_scripts/train_scm_ladd.py` (`train`: G and D phases, `get_timesteps` with
`weighting_scheme_discriminator: logit_normal_trigflow`, whose atan(sigma / 0.5) in `diffusion/model/respace.py`
hard-codes 0.5). Deliberate differences: re-noising happens on the teacher's own schedule (the same SNR), real and
fake always draw their own times (SANA's default `diff_timesteps_D`), and misaligned pairs and R1 (off by
default there) are left out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import parallel
from ..devices import to_device
from ..registry import register
from .base import Batch, LossOutput, Objective, Phase
from .terms import frozen, sample_generator

SANA_SIGMA_D = 0.5  # the divisor of SANA-Sprint's discriminator angles atan(exp(n) / 0.5), whatever sigma_data


def renoised(obj: Objective, x0: torch.Tensor, p_mean: float, p_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t): x0 noised on the teacher's schedule at sigma/alpha = exp(N(p_mean, p_std)) / 0.5 (SANA-Sprint's
    discriminator times), fresh noise per sample."""
    schedule = obj.nets.teacher.schedule
    n = p_mean + p_std * parallel.randn(len(x0))
    t = to_device(schedule.t_of_logsnr(-2 * (n - math.log(SANA_SIGMA_D))).float(), x0.device)
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
    return LossOutput(loss, {"loss/discriminator": loss.detach(), "gan/d_accuracy": acc.detach()})


@dataclass
class LADDConfig:
    name: str = "ladd"
    d_p_mean: float = -0.6  # re-noising for the discriminator: sigma/alpha = exp(N(d_p_mean, d_p_std)) / 0.5
    #                         (SANA-Sprint's atan(exp(N) / 0.5) with data scaled by sigma_d)
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
        return LossOutput(loss, {"loss/generator": loss.detach()}, samples=x0.detach())
