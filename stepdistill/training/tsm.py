"""Teacher score matching (TSM): pretraining a smaller, randomly initialised student before distillation.

MSD (Song et al. 2024, Sec. 3.3) trains students narrower than the teacher in three stages; the first regresses the
student's score onto the teacher's at noised real samples of the student's own classes. Here the student's x0
prediction is regressed onto the teacher's at x_t = alpha x0 + sigma eps, t uniform in [0, 1], weighted
(alpha^2 + sigma^2) / sigma^2 as the fake score's denoising loss is (on VP schedules: the v-prediction MSE, i.e. a
score difference that stays finite as sigma -> 0). Off unless `generator.tsm_iterations`; needed when
generator.width < 1.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from .. import parallel
from ..diffusion.schedules import bcast
from ..diffusion.timesteps import uniform_t
from ..models.score import ScoreModel, device_of


def tsm_loss(student: ScoreModel, teacher: ScoreModel, x0: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """Weighted MSE between student and teacher x0 predictions at one random noising of x0 (N, ...)."""
    t = uniform_t(len(x0), 0.0, 1.0, teacher.schedule, x0.device, rand=parallel.rand)
    x_t = teacher.schedule.add_noise(x0, parallel.randn_like(x0), t)
    with torch.no_grad():  # the teacher is the target, not a network being trained
        target = teacher(x_t, t, cond).x0
    alpha, sigma = teacher.schedule.alpha_sigma(t)
    weight = bcast((alpha ** 2 + sigma ** 2) / sigma.clamp_min(1e-4) ** 2, x0)
    return (weight * (student(x_t, t, cond).x0.float() - target) ** 2).mean()


def teacher_score_matching(student: ScoreModel, teacher: ScoreModel, data, sample_cond: Callable[[int], torch.Tensor
                           | None], lr: float, steps: int, batch_size: int, quiet: bool = False) -> float:
    """Fit `student` to `teacher` for `steps` Adam iterations (its own optimiser, as the regression warm start) on
    real samples `data.sample(n, cond)` with labels from `sample_cond(n)`; returns the last loss."""
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    device = device_of(student)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc="teacher score matching", disable=quiet, leave=False):
        cond = sample_cond(batch_size)
        x0 = data.sample(batch_size, cond).float().to(device)
        cond = None if cond is None else cond.to(device)
        loss = tsm_loss(student, teacher, x0, cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    student.zero_grad(set_to_none=True)
    return float(loss.detach())
