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

`adversarial: true` is SiDA (Zhou et al., "Adversarial Score identity Distillation", ICLR 2025; docs/methods.md).
The discriminator reads the fake score's bottleneck: a small trainable head on it (`discriminator: head`) or, as in
SiDA itself, no head at all: the channel mean of the features is the logit (`discriminator: encoder_mean`). It is
trained with the fake score, in its phase, on real and generated samples noised with ONE noise and ONE sigma per
sample, sigma = exp(N(d_p_mean, d_p_std)) (EDM's log-normal, mapped onto the teacher's t through its log-SNR
-2 log sigma), by gan_d_weight x mean_i lambda(sigma_i) x (BCE(D(real), 1) + BCE(D(fake), 0)) / 2 with EDM's
lambda = (sigma^2 + sd^2) / (sigma sd)^2 (sd = d_sigma_data). The generator, after `gan_warmup` iterations, gets

    0.5 L_SiD + 0.5 gan_scale * numel * mean softplus(-clamp(D(x_t), -10, 10)) * mean_i(1/wf_i),

D read on the same x_t as L_SiD, numel the elements of one sample, gan_scale = lsg_gan / lsg = 0.01 / 100, so on
CIFAR-10 (numel 3072) the GAN term is 0.31x the SiD term's scale and on 64x64x4 latents 1.6x. The generator does not
update before `generator_warmup` iterations (the fake score and discriminator warm up alone).

Reference: mingyuanzhou/SiD, branch sida: sida_training/sida_loss.py (SIDA_EDMLoss.generator_share_encoder_loss,
fakescore_discriminator_share_encoder_loss) and sida_training_loop.py (lsg 100, lsg_gan 0.01, lsd 1, the GAN term
after 200k images and generator steps after 100k, at batch 256: 782 and 391 iterations here). Deliberate
differences: the warm-ups are counted in iterations of this loop, not images; the fake score's denoising loss keeps
its own uniform times instead of sharing the discriminator's pass; `discriminator: head` is this toolkit's default
(a head the other GAN objectives share), SiDA's own is encoder_mean; with `weighting: alpha` the GAN term takes the
same per-sample factor alpha(t) in place of 1/wf (SiDA has only 1/wf). As in the reference, lambda multiplies the
batch-mean BCEs (mean_i lambda_i x the means), not each sample's BCE.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F

from .. import parallel
from ..devices import to_device
from ..diffusion.timesteps import uniform_t
from ..errors import RecipeError
from ..models.discriminator import discriminate
from ..registry import register
from .base import Batch, LossOutput, Objective, Phase
from .terms import denoising_loss, fake_phase, frozen, sample_generator

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
    discriminator: Literal["head", "encoder_mean"] = "head"  # SiDA's own is encoder_mean (no trainable head)
    gan_scale: float = 1e-4  # SiDA's lsg_gan / lsg = 0.01 / 100; the GAN term is also multiplied by numel
    gan_d_weight: float = 1.0  # SiDA's lsd: the discriminator loss's weight in the fake score's (EDM2 ImageNet: 100)
    d_p_mean: float = -1.2  # discriminator sigma = exp(N(d_p_mean, d_p_std)) (SiDA: EDM's P_mean, P_std)
    d_p_std: float = 1.2
    d_sigma_data: float = 0.5  # lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2
    gan_warmup: int = 782  # iterations before the GAN term reaches the generator (SiDA: 200k images at batch 256)
    generator_warmup: int = 391  # iterations with the generator frozen (SiDA: 100k images at batch 256)
    weighting: Literal["sid", "alpha"] = "sid"  # per-sample 1/wf (SiD) or alpha(t) (SiD-DiT's 1 - sigma on flows)


def sid_loss(x_g: torch.Tensor, y_r: torch.Tensor, y_f: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-sample SiD generator loss (before the wf normalisation), summed over each sample's elements."""
    dims = tuple(range(1, x_g.ndim))
    d = y_r - y_f
    return (d * ((y_r - x_g) - alpha * d)).sum(dim=dims)


def sida_generator_loss(x_g: torch.Tensor, y_r: torch.Tensor, y_f: torch.Tensor, alpha: float,
                        logits: torch.Tensor | None, gan_scale: float,
                        norm: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The generator loss: L_SiD = mean_i norm_i L_i (norm = SiD's 1/wf unless given), and with logits SiDA's
    0.5 L_SiD + 0.5 gan_scale numel g mean_i norm_i, g = mean softplus(-clamp(logits, -10, 10)) over every logit.
    Non-finite samples are dropped from L_SiD (counted in the mean's denominator), as SiD does."""
    dims = tuple(range(1, x_g.ndim))
    if norm is None:
        norm = 1 / (x_g - y_r).abs().mean(dim=dims).detach().clamp_min(1e-5)
    per_sample = sid_loss(x_g, y_r, y_f, alpha) * norm
    keep = torch.isfinite(per_sample)  # where, not indexing: a fixed size, nothing for a GPU to wait on
    loss = torch.where(keep, per_sample, 0.0).sum() / len(per_sample)
    logs = {"loss/generator": loss.detach(), "sid/dropped": (~keep).sum().float()}
    if logits is None:
        return loss, logs
    g = F.softplus(-logits.float().clamp(-10, 10)).mean()
    adv = gan_scale * x_g[0].numel() * g * torch.where(keep, norm, 0.0).detach().sum() / len(norm)
    logs["loss/generator_adv"] = adv.detach()
    return 0.5 * loss + 0.5 * adv, logs


@register("objective", "sid")
class SiD(Objective):
    contract_overrides = ("objective.adversarial=true",)
    guided_overrides = ("objective.kappa1=2", "objective.kappa2=2", "objective.kappa4=2")
    Config = SiDConfig
    needs = frozenset({"teacher", "fake_score"})

    @classmethod
    def needs_for(cls, cfg) -> frozenset[str]:
        if not cfg.adversarial:
            return cls.needs
        return cls.needs | ({"data"} if cfg.discriminator == "encoder_mean" else {"discriminator", "data"})

    def __init__(self, cfg: SiDConfig, nets, shape: tuple[int, ...]) -> None:
        if cfg.guidance not in GUIDANCE_MODES:  # also checked by the recipe; direct construction lands here
            raise RecipeError(f"unknown objective.guidance {cfg.guidance!r}; choose one of {', '.join(GUIDANCE_MODES)}")
        bad = [f"objective.{k} must be >= 0, got {getattr(cfg, k)}" for k in ("gan_warmup", "generator_warmup",
                                                                               "d_p_std", "gan_scale", "gan_d_weight")
               if getattr(cfg, k) < 0]
        bad += [f"objective.d_sigma_data must be > 0, got {cfg.d_sigma_data}"] if cfg.d_sigma_data <= 0 else []
        if bad:
            raise RecipeError("; ".join(bad) + " (SiDA's values: gan_warmup 782, generator_warmup 391, d_p_std 1.2, "
                              "gan_scale 1e-4, gan_d_weight 1, d_sigma_data 0.5)")
        super().__init__(cfg, nets, shape)

    @classmethod
    def warm_start_guidance(cls, cfg: SiDConfig) -> float:
        """The teacher's scale in the generator loss (kappa4; 1 under zero_cfg): the guided teacher the student is
        pulled toward, so a warm start regresses onto that teacher's ODE pairs, not the unguided ones."""
        return 1.0 if cfg.guidance == "zero_cfg" else cfg.kappa4

    def scales(self) -> tuple[float, float, float]:
        """(teacher, fake in the generator loss, fake in its own training) guidance scales."""
        c = self.cfg
        teacher = self.warm_start_guidance(c)
        if c.guidance == "zero_cfg":
            return teacher, 0.0, c.kappa1
        return teacher, c.anti_scale if c.guidance == "anti_cfg" else c.kappa2, c.kappa1

    def phases(self, step: int) -> list[Phase]:
        fake = fake_phase(self, self.fake_loss)  # SiD: fake first, then G
        if not self.cfg.adversarial:
            return [fake, Phase("generator", self.generator_loss)]
        if step < self.cfg.generator_warmup:  # SiDA: the fake score and discriminator warm up alone
            return [fake]
        return [fake, Phase("generator", partial(self.generator_loss, gan=step >= self.cfg.gan_warmup))]

    def fake_loss(self, batch: Batch, samples: torch.Tensor | None) -> LossOutput:
        x_g = sample_generator(self, batch, grad=False).float()
        teacher_s, fake_s, train_s = self.scales()
        guided = {train_s, fake_s} != {1.0}
        out = denoising_loss(self, batch, x_g, self.cfg.t_min, self.cfg.t_max, train_s,
                             self.cfg.cond_dropout if guided else 0.0)
        if not self.cfg.adversarial:
            return out
        d = self.discriminator_loss(batch, x_g)
        return LossOutput(out.loss + self.cfg.gan_d_weight * d.loss, {**out.logs, **d.logs})

    def discriminator_times(self, n: int, device: torch.device) -> torch.Tensor:
        """SiDA's discriminator times: sigma = exp(N(d_p_mean, d_p_std)) as the teacher's t (log-SNR -2 log sigma)."""
        log_sigma = self.cfg.d_p_mean + self.cfg.d_p_std * parallel.randn(n)
        return to_device(self.nets.fake_score.schedule.t_of_logsnr(-2 * log_sigma).float(), device)

    def discriminator_loss(self, batch: Batch, fake_x0: torch.Tensor) -> LossOutput:
        """lambda-weighted BCE of the discriminator on real and generated samples sharing each sample's noise and
        sigma; backpropagates into the fake score (and the head, if any)."""
        if batch.x0 is None:
            raise ValueError("SiDA's discriminator needs real samples in Batch.x0")
        fake = self.nets.fake_score
        t = self.discriminator_times(len(fake_x0), fake_x0.device)
        eps = parallel.randn_like(fake_x0)
        logits_fake = discriminate(fake, self.nets.discriminator, fake.schedule.add_noise(fake_x0, eps, t), t,
                                   batch.cond)[1]
        real = batch.x0.to(fake_x0)
        logits_real = discriminate(fake, self.nets.discriminator, fake.schedule.add_noise(real, eps, t), t,
                                   batch.cond)[1]
        alpha, sigma = fake.schedule.alpha_sigma(t)  # lambda of the sigma actually used (t_of_logsnr clamps)
        lam = 1 / self.cfg.d_sigma_data ** 2 + (alpha / sigma.clamp_min(1e-8)) ** 2
        bce = 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
        loss = lam.mean() * bce
        acc = 0.5 * ((logits_fake < 0).float().mean() + (logits_real > 0).float().mean())
        return LossOutput(loss, {"loss/discriminator": loss.detach(), "gan/d_bce": bce.detach(),
                                 "gan/d_accuracy": acc.detach()})

    def generator_loss(self, batch: Batch, samples: torch.Tensor | None = None, gan: bool = True) -> LossOutput:
        """SiD's generator loss; with adversarial and `gan`, SiDA's (phases() passes gan=False during warm-up)."""
        cfg, nets = self.cfg, self.nets
        teacher_s, fake_s, _ = self.scales()
        x_g = sample_generator(self, batch, grad=True).float()
        t = uniform_t(batch.n, cfg.t_min, cfg.t_max, nets.teacher.schedule, x_g.device, rand=parallel.rand)
        x_t = nets.teacher.schedule.add_noise(x_g, parallel.randn_like(x_g), t)
        with frozen(nets.fake_score, nets.discriminator):  # gradients reach x_g through both nets, not their weights
            y_r = nets.teacher.guided(x_t, t, batch.cond, teacher_s).x0
            y_f = nets.fake_score.guided(x_t, t, batch.cond, fake_s).x0
            norm = nets.teacher.schedule.alpha_sigma(t)[0] if cfg.weighting == "alpha" else None
            logits = (discriminate(nets.fake_score, nets.discriminator, x_t, t, batch.cond)[1]
                      if cfg.adversarial and gan else None)
            loss, logs = sida_generator_loss(x_g, y_r, y_f, cfg.alpha, logits, cfg.gan_scale, norm)
        return LossOutput(loss, logs, samples=x_g.detach())
