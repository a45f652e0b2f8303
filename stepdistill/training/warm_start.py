"""Regression warm start on teacher ODE pairs (DMD v1's regression loss; DMD2's SDXL one-step recipe).

Before distillation the generator is fitted to map noise z to the teacher's deterministic ODE output x0(z) for a
fixed set of pairs, with a mean squared error (DMD2 uses LPIPS on SDXL; MSE needs no extra network and suits small
images and vectors). The ODE runs with the objective's teacher guidance (`objective.guidance_scale`), so the start
is the guided teacher the objective distils. A K-step generator is warm-started on its first step. Off unless
`generator.warm_start_iterations`.

The pairs start from the generator's own input distribution. With `generator.start_noise=schedule` the ODE starts
at the start time from the generator's input sigma(start_t) z. With `pure` it starts at t = 1 from the t = 1 noise
the generator is given, whatever time the generator is conditioned on: DMD2's SDXL one-step student (timestep 399)
is pretrained on ODE pairs that start from pure noise at 999.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from ..diffusion.solvers import sample_ode
from ..models.score import device_of


def teacher_pairs(teacher, n: int, nfe: int, batch_size: int = 256, classes: list[int] | None = None,
                  guidance_scale: float = 1.0, generator=None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(z, cond, x0): n unit noises, their conditions (drawn from `classes` when given) and the teacher's ODE outputs
    (Euler, `nfe` steps, classifier-free guided with `guidance_scale`) from `generator`'s input for z (its prior) at
    its start time (start_noise schedule) or at t = 1 (pure; also without a generator)."""
    score = teacher.score
    prior = generator.prior if generator is not None else (lambda z: z * score.schedule.init_sigma)
    start = generator.times[0] if generator is not None and generator.start_noise == "schedule" else 1.0
    device = device_of(score)
    z = torch.randn(n, *teacher.shape).to(device)
    cond = teacher.sample_cond(n, classes=classes)
    cond = None if cond is None else cond.to(device)
    out = []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            c = None if cond is None else cond[i:i + batch_size]
            x, _ = sample_ode(lambda x, t, c=c: score.guided(x, t, c, guidance_scale),
                              prior(z[i:i + batch_size]), score.schedule, nfe, heun=False, t_max=start)
            out.append(x)
    return z, cond, torch.cat(out)


def regression_warm_start(generator, pairs: tuple, lr: float, steps: int, batch_size: int, quiet: bool = False
                          ) -> float:
    """Fit the generator's first step to teacher ODE `pairs` (teacher_pairs' (z, cond, x0)) for `steps` Adam
    iterations (its own optimiser, so distillation starts with fresh moments); returns the last loss."""
    z, cond, target = pairs
    pairs = len(z)
    optimizer = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc="regression warm start", disable=quiet, leave=False):
        idx = torch.randint(0, pairs, (min(batch_size, pairs),))
        x0 = generator.step(generator.prior(z[idx]), 0, None if cond is None else cond[idx])
        loss = (x0.float() - target[idx]).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    generator.zero_grad(set_to_none=True)
    return float(loss.detach())
