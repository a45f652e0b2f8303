"""Sample pictures written during and after training."""
from __future__ import annotations

import torch

from .harness import generate_student
from .visual import save_grid, save_scatter


@torch.no_grad()
def save_samples(trainer, tag: str) -> None:
    """DIR/samples/<tag>.png: a 10x10 grid (one class per column) for images, a scatter over the exact mixture for
    vectors. Fixed noise (seed train.seed + 1000), so grids of successive iterations are comparable."""
    teacher, student = trainer.built.teacher, trainer.student()
    path = trainer.outdir / "samples" / f"{tag}.png"
    was_training = student.training
    student.eval()
    with torch.random.fork_rng():  # sampling must not move the training run's random stream
        if teacher.is_image:
            save_grid(generate_student(student, teacher, 100, trainer.cfg.seed + 1000, 100), path, nrow=10)
        else:
            xs = generate_student(student, teacher, 2000, trainer.cfg.seed + 1000, 2000)
            ref = teacher.sample(2000, torch.Generator().manual_seed(trainer.cfg.seed + 1001))
            save_scatter(xs, ref, path, title=f"{tag}: student ({student.steps} step) vs exact mixture")
    student.train(was_training)
