"""ASD: adversarial self-distillation (Yang et al., 2025, arXiv 2511.01419; docs/methods.md).

On top of VSD/DMD2 distribution matching of a K-step student, a discriminator aligns the student's n-step outputs
with its own (n+1)-step outputs (1 <= n < K; the (n+1)-step output plays "real"), a smaller gap than to the teacher,
so one student serves every step count up to K. The paper's discriminator architecture and weight were not retrieved;
as docs/methods.md suggests, the discriminator is DMD2's head on the fake score's bottleneck (models/discriminator.py),
trained in the fake score's phase with `gan_d_weight`, and the generator gets `asd_weight x softplus(-D)` on its
n-step output (the last of its n steps carries the gradient, as in backward simulation). No real data is needed.
As in DMD2's diffusion GAN, every sample the discriminator sees is noised with its own noise at a time drawn in
[gan_t_min, gan_t_max] (default the full range, DMD2's 0..999).

Reference code: none public (BigAandSmallq/SAD has a README only); this builds on tianweiy/DMD2
main/sd_guidance.py (compute_generator_clean_cls_loss, compute_guidance_clean_cls_loss), swapping its real data for
the student's own (n+1)-step outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import parallel
from ..errors import RecipeError
from ..registry import register
from .base import Batch, LossOutput
from .terms import generator_adv_loss
from .vsd import VSD, VSDConfig


@dataclass
class ASDConfig(VSDConfig):
    name: str = "asd"
    asd_weight: float = 3e-3  # generator weight of the n-vs-(n+1)-step adversarial term (DMD2's GAN scale)


@register("objective", "asd")
class ASD(VSD):
    contract_overrides = ("generator.steps=3",)
    guided_overrides = ()
    Config = ASDConfig

    @classmethod
    def needs_for(cls, cfg) -> frozenset[str]:
        return cls.needs | {"discriminator"}

    def __init__(self, cfg: ASDConfig, nets, shape: tuple[int, ...]) -> None:
        if cfg.gan_weight > 0:
            raise RecipeError("objective asd uses its discriminator for n- vs (n+1)-step outputs; set "
                              f"objective.gan_weight=0 (got {cfg.gan_weight}) or use objective vsd for DMD2's GAN")
        if nets.generator.steps < 2:
            raise RecipeError("objective asd aligns a student's n-step outputs with its (n+1)-step ones and needs a "
                              f"few-step student: set generator.steps >= 2 (got {nets.generator.steps})")
        super().__init__(cfg, nets, shape)

    def n_step(self, batch: Batch, n: int, grad: bool) -> torch.Tensor:
        """The student's n-step samples; with grad, only the last step carries gradients."""
        gen = self.nets.generator
        z = parallel.randn(batch.n, *self.shape, device=self.device)
        x_in = gen.backward_simulate(z, batch.cond, n - 1, steps=n)
        with torch.set_grad_enabled(grad):
            return gen.step(x_in, n - 1, batch.cond, steps=n)

    def draw_n(self) -> int:
        return int(torch.randint(1, self.nets.generator.steps, ()))

    def generator_loss(self, batch: Batch, samples: torch.Tensor | None = None) -> LossOutput:
        out = super().generator_loss(batch, samples)
        x_n = self.n_step(batch, self.draw_n(), grad=True)
        adv = generator_adv_loss(self, batch, x_n, self.cfg.gan_t_min, self.cfg.gan_t_max)
        loss = out.loss + self.cfg.asd_weight * adv
        return LossOutput(loss, {**out.logs, "loss/generator_asd": adv.detach()}, samples=out.samples)

    def gan_pair(self, batch: Batch, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.draw_n()
        with torch.no_grad():
            return self.n_step(batch, n, grad=False), self.n_step(batch, n + 1, grad=False)
