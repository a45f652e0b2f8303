"""Pieces several objectives share: sampling the generator, the fake score's denoising loss, the GAN losses."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .. import parallel
from ..devices import to_device
from ..diffusion.schedules import bcast
from ..diffusion.timesteps import uniform_t
from ..errors import InputError
from ..models.discriminator import discriminate
from ..models.score import ScoreModel
from .base import Batch, LossOutput, Objective, Phase


def sample_generator(obj: Objective, batch: Batch, grad: bool) -> torch.Tensor:
    """x0 from the generator. A K-step generator trains one random step k per iteration on inputs made by its own
    first k steps (DMD2's backward simulation; few-step SiD's uniform mixture); only step k carries gradients."""
    gen = obj.nets.generator
    z = parallel.randn(batch.n, *obj.shape, device=obj.device)
    k = int(torch.randint(0, gen.steps, ())) if gen.steps > 1 else 0
    x_in = gen.backward_simulate(z, batch.cond, k) if k > 0 else gen.prior(z)
    with torch.set_grad_enabled(grad):
        return gen.step(x_in, k, batch.cond)


def drop_cond(score: ScoreModel, cond: torch.Tensor | None, p: float) -> torch.Tensor | None:
    """Replace each condition by the null condition with probability p (so a guided fake score learns both)."""
    if cond is None or p <= 0 or score.conditioning == "none":
        return cond
    mask = parallel.rand(len(cond)) < p
    return torch.where(to_device(mask.reshape(-1, *[1] * (cond.ndim - 1)), cond.device), score.null(cond), cond)


def denoising_loss(obj: Objective, batch: Batch, x0: torch.Tensor, t_min: float, t_max: float,
                   guidance_scale: float = 1.0, cond_dropout: float = 0.0, weighting: str = "v") -> LossOutput:
    """Denoising score matching of the fake score on detached samples x0, in x0 space with per-time weight
    `weighting`: "v", (alpha^2 + sigma^2) / sigma^2, on VP schedules exactly the v-prediction MSE a teacher like ours
    was trained with; "swiftbrush", alpha^4 / sigma^2, SwiftBrush's LoRA loss mse(alpha eps_hat, alpha eps) (as
    eps_hat - eps = -(alpha / sigma)(x0_hat - x0)). With a guidance scale other than 1 the guided prediction is what is
    fitted (SiD-LSG's kappa_1)."""
    if weighting not in ("v", "swiftbrush"):
        raise InputError(f"unknown denoising-loss weighting {weighting!r}; choose v or swiftbrush")
    fake = obj.nets.fake_score
    cond = drop_cond(fake, batch.cond, cond_dropout)
    t = uniform_t(len(x0), t_min, t_max, fake.schedule, x0.device, rand=parallel.rand)
    x_t = fake.schedule.add_noise(x0, parallel.randn_like(x0), t)
    alpha, sigma = fake.schedule.alpha_sigma(t)
    top = alpha ** 4 if weighting == "swiftbrush" else alpha ** 2 + sigma ** 2
    weight = bcast(top / sigma.clamp_min(1e-4) ** 2, x0)
    loss = (weight * (fake.guided(x_t, t, cond, guidance_scale).x0 - x0) ** 2).mean()
    return LossOutput(loss, {"loss/fake_score": loss.detach()})


@contextmanager
def frozen(*modules: nn.Module | None):
    """Build the graph without parameter gradients for these modules (gradients still flow through their inputs).
    Sharded parameters (train.fsdp) are left alone: FSDP keeps a gathered copy whose requires_grad it sets only when
    it gathers, so a toggle could outlive the block; their gradients are computed and then dropped by the trainer, which
    clears every network's gradients after each phase."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad
              and not parallel.is_sharded(p)]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def discriminator_loss(obj: Objective, batch: Batch, fake_x0: torch.Tensor, real_x0: torch.Tensor | None,
                       t_min: float, t_max: float) -> LossOutput:
    """Non-saturating GAN loss of the head on the fake score's features: softplus(D(fake)) + softplus(-D(real)), on
    copies noised with fresh noise at independent times in [t_min, t_max] (DMD2's "diffusion GAN", which draws them
    over the full range 0..999). Backpropagates into the head and the fake score. The real side is `real_x0`, by
    default the batch's real samples."""
    real_x0 = batch.x0 if real_x0 is None else real_x0
    if real_x0 is None:
        raise ValueError("the discriminator needs real samples in Batch.x0")
    fake, head = obj.nets.fake_score, obj.nets.discriminator
    logits = []
    for x0 in (fake_x0, real_x0.to(fake_x0)):
        t = uniform_t(len(x0), t_min, t_max, fake.schedule, x0.device, rand=parallel.rand)
        x_t = fake.schedule.add_noise(x0, parallel.randn_like(x0), t)
        logits.append(discriminate(fake, head, x_t, t, batch.cond)[1])
    loss = F.softplus(logits[0]).mean() + F.softplus(-logits[1]).mean()
    acc = 0.5 * ((logits[0] < 0).float().mean() + (logits[1] > 0).float().mean())
    return LossOutput(loss, {"loss/discriminator": loss.detach(), "gan/d_accuracy": acc.detach()})


def generator_adv_loss(obj: Objective, batch: Batch, x0: torch.Tensor, t_min: float, t_max: float) -> torch.Tensor:
    """The generator's non-saturating GAN term softplus(-D(x_t)) on its samples x0 re-noised with their own fresh
    noise at times drawn in [t_min, t_max] (DMD2's compute_generator_clean_cls_loss with diffusion_gan). Gradients
    reach x0 through the fake score and the head, whose parameters get none."""
    fake, head = obj.nets.fake_score, obj.nets.discriminator
    t = uniform_t(len(x0), t_min, t_max, fake.schedule, x0.device, rand=parallel.rand)
    x_t = fake.schedule.add_noise(x0, parallel.randn_like(x0), t)
    with frozen(fake, head):
        _, logits = discriminate(fake, head, x_t, t, batch.cond)
    return F.softplus(-logits).mean()


def fake_phase(obj: Objective, loss) -> Phase:
    """The fake score's phase; a discriminator head, when the run has one, trains in the same phase."""
    return Phase(("fake_score", "discriminator") if obj.nets.discriminator is not None else "fake_score", loss)


def plus_discriminator_loss(obj: Objective, batch: Batch, fake_x0: torch.Tensor, out: LossOutput, weight: float,
                            t_min: float, t_max: float, real_x0: torch.Tensor | None = None) -> LossOutput:
    """The fake score's loss plus `weight` x the discriminator's (DMD2, SiDA), when the run has a discriminator."""
    if obj.nets.discriminator is None:
        return out
    d = discriminator_loss(obj, batch, fake_x0, real_x0, t_min, t_max)
    return LossOutput(out.loss + weight * d.loss, {**out.logs, **d.logs})
