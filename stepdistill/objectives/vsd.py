"""VSD / DMD2 distribution matching, with DMD2's GAN term, SwiftBrush's weighting and SNOOPI's random guidance.

Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2, 2024), Sec. 3 and eq. (2);
Wang et al., ProlificDreamer (VSD, 2023); Nguyen & Tran, SwiftBrush (2024). The generator's gradient at its sample x0
is the score difference s_fake - s_real at a noised copy x_t (t in [t_min, t_max]), written as x0_fake - x0_real.
`weighting: dmd` (default) normalises it per sample by mean|x0 - x0_real| (DMD2); `weighting: swiftbrush` uses
SwiftBrush's g = sigma^2 (eps_real - eps_fake) = alpha sigma (x0_fake - x0_real) (as eps = (x_t - alpha x0) / sigma),
no normaliser, trains the fake score with SwiftBrush's LoRA loss mse(alpha eps_hat, alpha eps) = alpha^4 / sigma^2
in x0 space, and guides the fake score at the teacher's scale as SwiftBrush guides its LoRA. Either way the gradient is
applied through a pseudo-target, L = 0.5 * mean((x0 - sg(x0 - g))^2), so dL/dx0 = g / numel: no gradient flows
through the teacher or the fake score. The fake score tracks the generator's distribution by denoising score
matching on detached generator samples, `update_ratio` times per generator update (DMD2's TTUR).

`gan_weight` > 0 adds DMD2's adversarial term: a head on the fake score's bottleneck classifies noised real vs
generated samples (its loss, times `gan_d_weight`, joins the fake score's; it needs real data), and the generator
gets `gan_weight * softplus(-D(x_t'))`. As in DMD2's diffusion GAN, every sample D sees (the generator's, and real and
fake in D's loss) is noised with its own fresh noise at t' ~ U[gan_t_min, gan_t_max], by default the full range
(DMD2: U{0..diffusion_gan_max_timestep - 1} = 0..999), independently of the distribution-matching pass.
`regression_weight` > 0 adds DMD (v1)'s regression loss: the generator's MSE on the regression warm start's teacher ODE
pairs, at every generator update (DMD: LPIPS, weight 0.25).
`guidance_range` turns on SNOOPI's random guidance: each iteration draws one guidance scale, applied to the teacher
and the fake score alike (the fake then learns its unconditional prediction too, from `cond_dropout` of its
training batches). SNOOPI's PG-SB is defined on SwiftBrush: PG-SB = `guidance_range` with `weighting: swiftbrush`.

Reference code: tianweiy/DMD2 main/sd_guidance.py (compute_distribution_matching_loss, compute_loss_fake,
compute_cls_logits, compute_generator_clean_cls_loss, compute_guidance_clean_cls_loss) and VinAIResearch/SwiftBrush
train_swiftbrush.py (its VSD and LoRA losses). Deliberate differences: everything is computed on canonical x0
predictions (DMD2 and SwiftBrush convert from eps); DMD2's fake-score loss is plain eps MSE on SD (EDM's lambda on
ImageNet), here the v-weighted x0 loss of terms.denoising_loss; SwiftBrush drops the whole batch's prompt 10% of the
time, here each sample's condition with probability `cond_dropout`, and only when the fake score is guided.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .. import parallel
from ..diffusion.schedules import bcast
from ..diffusion.timesteps import uniform_t
from ..errors import RecipeError
from ..models.discriminator import discriminate
from ..models.score import ScoreModel
from ..registry import register
from .base import Batch, LossOutput, Objective, Phase
from .terms import denoising_loss, fake_phase, frozen, generator_adv_loss, plus_discriminator_loss, sample_generator

WEIGHTINGS = ("dmd", "swiftbrush")


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
    gan_t_min: float = 0.0  # times of the discriminator's inputs, real and generated (DMD2's diffusion GAN: 0..999)
    gan_t_max: float = 1.0
    guidance_range: list[float] | None = None  # SNOOPI: per-iteration scale ~ U[lo, hi] for teacher and fake
    cond_dropout: float = 0.1  # share of fake-score training batches made unconditional when the fake is guided
    weighting: Literal["dmd", "swiftbrush"] = "dmd"  # DMD2's per-sample normaliser, or SwiftBrush's alpha sigma
    # DMD's regression loss: the generator's MSE on the warm start's teacher ODE pairs (generator.warm_start_pairs,
    # made even without warm-start iterations, kept in checkpoints), added at every generator update (DMD: 0.25, LPIPS)
    regression_weight: float = 0.0

    def __post_init__(self) -> None:  # runs for the recipe and for direct construction alike
        if self.update_ratio < 1:
            raise RecipeError(f"objective.update_ratio must be >= 1, got {self.update_ratio}")
        if self.regression_weight < 0:
            raise RecipeError(f"objective.regression_weight must be >= 0, got {self.regression_weight}")


@register("objective", "vsd")
class VSD(Objective):
    contract_overrides = ("objective.gan_weight=0.01",)
    guided_overrides = ("objective.guidance_range=[1.0,3.0]",)
    Config = VSDConfig
    needs = frozenset({"teacher", "fake_score"})
    logits_at_dm_pass: bool = False  # f-distill: D's logits at the distribution-matching x_t feed weight() and the GAN

    @classmethod
    def needs_for(cls, cfg) -> frozenset[str]:
        return cls.needs | ({"discriminator", "data"} if cfg.gan_weight > 0 else set())

    def __init__(self, cfg: VSDConfig, nets, shape: tuple[int, ...]) -> None:
        super().__init__(cfg, nets, shape)
        if cfg.guidance_range is not None and (len(cfg.guidance_range) != 2 or
                                               cfg.guidance_range[0] > cfg.guidance_range[1]):
            raise RecipeError("objective.guidance_range must be [low, high] with low <= high, got "
                              f"{cfg.guidance_range}")
        if not 0.0 <= cfg.gan_t_min <= cfg.gan_t_max <= 1.0:
            raise RecipeError(f"need 0 <= objective.gan_t_min <= objective.gan_t_max <= 1, got {cfg.gan_t_min}, "
                              f"{cfg.gan_t_max}")
        if cfg.weighting not in WEIGHTINGS:  # also checked by the recipe; direct construction lands here
            raise RecipeError(f"unknown objective.weighting {cfg.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        # (teacher, fake score) guidance of the current iteration; SwiftBrush guides its LoRA fake as the teacher
        self.scales = (cfg.guidance_scale, cfg.guidance_scale if cfg.weighting == "swiftbrush" else 1.0)
        self.keeps_pairs = cfg.regression_weight > 0
        self.pairs: tuple | None = None  # (z, cond, x0) for regression_weight, set by the warm start or a checkpoint

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.pairs is None:
            return {}
        z, cond, x0 = self.pairs
        return {"pairs.z": z, "pairs.x0": x0, **({} if cond is None else {"pairs.cond": cond})}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        pairs = {k: state.pop(k) for k in list(state) if k.startswith("pairs.")}
        super().load_state_dict(state)
        if pairs:
            self.pairs = (pairs["pairs.z"], pairs.get("pairs.cond"), pairs["pairs.x0"])

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

    def weight(self, logits: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weight of the distribution-matching direction at times t (f-distill's h(r)); None means 1."""
        return None

    def gan_pair(self, batch: Batch, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(fake, real) samples the discriminator separates: generated vs real data here (ASD: n vs n+1 steps)."""
        return samples, batch.x0

    # ---- losses ------------------------------------------------------------------------------------------------
    def generator_loss(self, batch: Batch, samples: torch.Tensor | None = None) -> LossOutput:
        cfg, nets = self.cfg, self.nets
        real_scale, fake_scale = self.scales
        x0 = sample_generator(self, batch, grad=True)
        schedule = nets.teacher.schedule
        t = uniform_t(batch.n, cfg.t_min, cfg.t_max, schedule, x0.device, rand=parallel.rand)
        x_t = schedule.add_noise(x0, parallel.randn_like(x0), t)
        logits, x0_fake = None, None
        if self.logits_at_dm_pass and nets.discriminator is not None:  # one fake-score pass: prediction and logits
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
            if cfg.weighting == "swiftbrush":  # sigma^2 (eps_real - eps_fake), in x0 predictions
                alpha, sigma = schedule.alpha_sigma(t)
                grad = bcast(alpha * sigma, x0_fake) * (x0_fake - x0_real)
            else:  # DMD2's per-sample normaliser
                dims = tuple(range(1, x0.ndim))
                norm = (x0.detach().float() - x0_real).abs().mean(dim=dims, keepdim=True)
                grad = (x0_fake - x0_real) / norm
            w = self.weight(None if logits is None else logits.detach(), t)
            if w is not None:
                grad = grad * w.reshape(-1, *[1] * (x0.ndim - 1))
            grad = torch.nan_to_num(grad.float())  # a zero normaliser gives inf/nan: zeroed, as in DMD2
        loss = 0.5 * F.mse_loss(x0.float(), (x0.float() - grad).detach())
        logs = {"loss/generator": loss.detach(), "vsd/grad_abs": grad.abs().mean().detach()}
        if nets.discriminator is not None and cfg.gan_weight > 0:
            # f-distill (FastGen) reuses the DM pass's logits; DMD2 re-noises the sample on its own
            adv = F.softplus(-logits).mean() if logits is not None else \
                generator_adv_loss(self, batch, x0, cfg.gan_t_min, cfg.gan_t_max)
            loss = loss + cfg.gan_weight * adv
            logs["loss/generator_adv"] = adv.detach()
        if cfg.regression_weight > 0:
            reg = self.regression_loss(batch.n)
            loss = loss + cfg.regression_weight * reg
            logs["loss/regression"] = reg.detach()
        return LossOutput(loss, logs, samples=x0.detach())

    def regression_loss(self, n: int) -> torch.Tensor:
        """DMD's regression term: MSE of the generator's first step on n of the teacher ODE pairs (this process's rows
        of a global draw, as noise is drawn)."""
        if self.pairs is None:
            raise RuntimeError("objective.regression_weight > 0 but no teacher ODE pairs were made (the training "
                               "loop's warm start makes them)")
        z, cond, target = self.pairs
        idx = parallel.rows(torch.randint(0, len(z), (n * parallel.world(),)))
        gen, device = self.nets.generator, self.device
        x0 = gen.step(gen.prior(z[idx].to(device)), 0, None if cond is None else cond[idx].to(device))
        return F.mse_loss(x0.float(), target[idx].to(device).float())

    def fake_loss(self, batch: Batch, samples: torch.Tensor | None) -> LossOutput:
        if samples is None:  # not a generator iteration: make fresh samples without gradients
            samples = sample_generator(self, batch, grad=False)
        samples = samples.float()
        # the fake score fits its plain prediction, guided or not: under PG-SB it is guided only where the generator's
        # gradient reads it (SwiftBrush's LoRA loss), and learns its unconditional branch from the dropped conditions
        guided = self.scales[1] != 1.0
        out = denoising_loss(self, batch, samples, self.cfg.fake_t_min, self.cfg.fake_t_max, 1.0,
                             self.cfg.cond_dropout if guided else 0.0,
                             "swiftbrush" if self.cfg.weighting == "swiftbrush" else "v")
        if self.nets.discriminator is None:
            return out
        fake, real = self.gan_pair(batch, samples)
        return plus_discriminator_loss(self, batch, fake, out, self.cfg.gan_d_weight, self.cfg.gan_t_min,
                                       self.cfg.gan_t_max, real)
