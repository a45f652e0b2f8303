"""Sample pictures written during and after training."""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.multi_student import describe
from .harness import generate_student
from .visual import save_grid, save_scatter


@torch.no_grad()
def save_samples(trainer, tag: str) -> None:
    """DIR/samples/<tag>.png for a trainer's current student (an MSD student: its own classes only)."""
    write_samples(trainer.built.teacher, trainer.student(), trainer.outdir, trainer.cfg.seed, tag,
                  getattr(trainer, "classes", None))


@torch.no_grad()
def write_samples(teacher, student, outdir: Path, seed: int, tag: str, classes: list[int] | None = None) -> None:
    """outdir/samples/<tag>.png: a 10x10 grid (one class per column) for images, a scatter over the exact mixture for
    vectors. Fixed noise (seed + 1000), so grids of successive iterations are comparable. With `classes` (one MSD
    student's) the grid has one column per class of the subset and the scatter's reference those components only."""
    path = Path(outdir) / "samples" / f"{tag}.png"
    was_training = student.training
    student.eval()
    with torch.random.fork_rng(devices=[]):  # sampling must not move the training run's random stream
        if teacher.is_image:
            nrow = 10 if classes is None else len(classes)
            xs = generate_student(student, teacher, 10 * nrow, seed + 1000, 100, classes=classes)
            save_grid(teacher.decode(xs), path, nrow=nrow)
        else:
            xs = generate_student(student, teacher, 2000, seed + 1000, 2000, classes=classes)
            cond = None if classes is None else teacher.eval_cond(2000, classes)
            ref = teacher.sample(2000, torch.Generator().manual_seed(seed + 1001), cond)
            what = "exact mixture" if classes is None else f"its components ({describe(classes)})"
            save_scatter(xs, ref, path, title=f"{tag}: student ({student.steps} step) vs {what}")
    student.train(was_training)
