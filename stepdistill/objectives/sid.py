"""SiD: Score identity Distillation, with SiDA's adversarial term and few-step SiD-LSG guidance.

Zhou et al., "Score identity Distillation" (ICML 2024), eq. (20)-(23); mingyuanzhou/SiD `sid_training_loop.py`.
Unlike VSD the generator loss is an explicit scalar and its gradient flows *through* the frozen teacher and fake
score into x_t = alpha x_g + sigma eps:

    L_G = sum[(y_r - y_f) * ((y_r - x_g) - alpha (y_r - y_f))] / wf,  wf = sg(mean|x_g - y_r|)

per sample (y_r teacher, y_f fake score, both x0 predictions), i.e. (1 - alpha)|y_r - y_f|^2 + (y_r - y_f).(y_f - x_g).
`weighting: alpha` replaces 1/wf by alpha(t), which is SiD-DiT's default (1 - sigma) on flow-matching teachers; on the
rectified-flow Gaussian mixture it is what lets few-step students converge (configs/toy/gmm_sid_2step.yaml).
The fake score is trained by denoising score matching, one update per generator update (1:1). SiD's optimiser is
Adam with beta1 = 0 (set in its recipes: `train.betas: [0.0, 0.999]`).

Guidance (SiD-LSG, Zhou et al. 2024; few-step SiD, 2025): `kappa1` when training the fake score (with
`cond_dropout` of its batches unconditional), `kappa2` for the fake score inside the generator loss, `kappa4` for the
teacher. `guidance: zero_cfg` evaluates the teacher at scale 1 and the fake score unconditionally (scale 0);
`anti_cfg` evaluates the fake score at the negative scale `anti_scale`. A K-step generator trains as a uniform
mixture of its steps: k is drawn per iteration and only the k-th step backpropagates.

`adversarial: true` is SiDA: a head on the fake score's features is trained on real vs generated samples, and the
generator loss becomes 0.5 L_SiD + 0.5 L_GAN (the GAN term scaled by `gan_scale` to the SiD term's size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .. import parallel
from ..diffusion.timesteps import uniform_t
from ..models.discriminator import discriminate
from ..registry import register
from .base import Batch, LossOutput, Objective, Phase
from .terms import denoising_loss, fake_phase, frozen, plus_discriminator_loss, sample_generator

GUIDANCE_MODES = ("lsg", "zero_cfg", "anti_cfg")


@dataclass
class SiDConfig:
    name: str = "sid"
    alpha: float = 1.2  # SiD's alpha (1.2 CIFAR/ImageNet/FFHQ, 1.0 AFHQ and SiD-LSG)
    t_min: float = 0.02  # generator-loss and fake-score times (SiD-LSG: 20..979 of 1000)
    t_max: float = 0.98
    guidance: Literal["lsg", "zero_cfg", "anti_cfg"] = "lsg"
    kappa1: float = 1.0  # fake-score training guidance
    kappa2: float = 1.0  # fake score in the generator loss (SiD-LSG's kappa2 = kappa3)
    kappa4: float = 1.0  # teacher
    anti_scale: float = -1.0  # the fake score's scale under anti_cfg (the paper's value was not retrieved)
    cond_dropout: float = 0.1  # unconditional share of fake-score batches whenever the fake score is guided
    adversarial: bool = False  # SiDA
    gan_scale: float = 1.0  # multiplies the GAN term before the 0.5/0.5 mix
    gan_d_weight: float = 1.0  # weight of the discriminator loss added to the fake score's
    weighting: Literal["sid", "alpha"] = "sid"  # per-sample 1/wf (SiD) or alpha(t) (SiD-DiT's 1 - sigma on flows)


def sid_loss(x_g: torch.Tensor, y_r: torch.Tensor, y_f: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-sample SiD generator loss (before the wf normalisation), summed over each sample's elements."""
    dims = tuple(range(1, x_g.ndim))
    d = y_r - y_f
    return (d * ((y_r - x_g) - alpha * d)).sum(dim=dims)


@register("objective", "sid")
class SiD(Objective):
    Config = SiDConfig
    needs = frozenset({"teacher", "fake_score"})

    @classmethod
    def needs_for(cls, cfg) -> frozenset[str]:
        return cls.needs | ({"discriminator", "data"} if cfg.adversarial else set())

    def __init__(self, cfg: SiDConfig, nets, shape: tuple[int, ...]) -> None:
        if cfg.guidance not in GUIDANCE_MODES:  # also checked by the recipe; direct construction lands here
            raise ValueError(f"unknown objective.guidance {cfg.guidance!r}; choose one of {', '.join(GUIDANCE_MODES)}")
        super().__init__(cfg, nets, shape)

    def scales(self) -> tuple[float, float, float]:
        """(teacher, fake in the generator loss, fake in its own training) guidance scales."""
        c = self.cfg
        if c.guidance == "zero_cfg":
            return 1.0, 0.0, c.kappa1
        if c.guidance == "anti_cfg":
            return c.kappa4, c.anti_scale, c.kappa1
        return c.kappa4, c.kappa2, c.kappa1

    def phases(self, step: int) -> list[Phase]:
        return [fake_phase(self, self.fake_loss), Phase("generator", self.generator_loss)]  # SiD: fake first, then G

    def fake_loss(self, batch: Batch, samples: torch.Tensor | None) -> LossOutput:
        x_g = sample_generator(self, batch, grad=False).float()
        teacher_s, fake_s, train_s = self.scales()
        guided = {train_s, fake_s} != {1.0}
        out = denoising_loss(self, batch, x_g, self.cfg.t_min, self.cfg.t_max, train_s,
                             self.cfg.cond_dropout if guided else 0.0)
        return plus_discriminator_loss(self, batch, x_g, out, self.cfg.gan_d_weight, self.cfg.t_min, self.cfg.t_max)

    def generator_loss(self, batch: Batch, samples: torch.Tensor | None = None) -> LossOutput:
        cfg, nets = self.cfg, self.nets
        teacher_s, fake_s, _ = self.scales()
        x_g = sample_generator(self, batch, grad=True).float()
        t = uniform_t(batch.n, cfg.t_min, cfg.t_max, nets.teacher.schedule, x_g.device)
        x_t = nets.teacher.schedule.add_noise(x_g, parallel.randn_like(x_g), t)
        with frozen(nets.fake_score, nets.discriminator):  # gradients reach x_g through both nets, not their weights
            y_r = nets.teacher.guided(x_t, t, batch.cond, teacher_s).x0
            y_f = nets.fake_score.guided(x_t, t, batch.cond, fake_s).x0
            if cfg.weighting == "alpha":
                per_sample = sid_loss(x_g, y_r, y_f, cfg.alpha) * nets.teacher.schedule.alpha_sigma(t)[0]
            else:
                wf = (x_g - y_r).abs().mean(dim=tuple(range(1, x_g.ndim))).detach().clamp_min(1e-5)
                per_sample = sid_loss(x_g, y_r, y_f, cfg.alpha) / wf
            keep = torch.isfinite(per_sample)  # SiD drops non-finite samples rather than the whole batch
            loss = per_sample[keep].sum() / len(per_sample)
            logs = {"loss/generator": loss.item(), "sid/dropped": float((~keep).sum())}
            if nets.discriminator is not None:
                _, logits = discriminate(nets.fake_score, nets.discriminator, x_t, t, batch.cond)
                adv = F.softplus(-logits).mean()
                loss = 0.5 * loss + 0.5 * cfg.gan_scale * adv
                logs["loss/generator_adv"] = adv.item()
        return LossOutput(loss, logs, samples=x_g.detach())
