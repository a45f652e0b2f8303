"""Reopen a training run folder: its recipe, its teacher and its student (EMA weights when the run keeps an EMA).

A multi-student run (generator.students = K > 1) keeps each student's run in students/k/; its student is then a
MultiStudent that routes each label to its student, with the Generator interface, so sampling, evaluation and
export treat it like any run.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError, MissingFileError
from .models.generator import Generator
from .models.lora import load_saved_state
from .models.multi_student import MultiStudent
from .models.score import student_guidance
from .recipe import Recipe, load_recipe
from .teachers import Teacher, build_teacher
from .training.state import list_checkpoints, load_latest, load_step, unprefixed
from .training.watch import BEST


@dataclass
class Run:
    path: Path
    recipe: Recipe
    teacher: Teacher
    student: Generator | MultiStudent
    step: int  # iterations trained (multi-student: those of the least-trained student)
    student_steps: list[int] | None = None  # multi-student: each student's iterations


def student_dir(path: str | Path, k: int) -> Path:
    """The run folder of student k (0-based) of a multi-student run."""
    return Path(path) / "students" / str(k)


def _load_generator(path: Path, recipe: Recipe, teacher: Teacher,
                    checkpoint: int | None = None) -> tuple[Generator, int]:
    found = None
    if checkpoint is not None:
        found = load_step([path / "checkpoints", path / BEST], checkpoint)
    elif recipe.train.select == "best":  # the watch's best check
        found = load_latest(path / BEST)
        if found is None:
            warnings.warn(f"train.select=best, but {path / BEST} holds no intact checkpoint: loading the last "
                          "iteration's student instead", stacklevel=3)
    found = found or load_latest(path / "checkpoints")
    if found is None:
        have = list_checkpoints(path / "checkpoints")
        raise MissingFileError(f"no intact checkpoint in {path / 'checkpoints'}"
                               + (f" ({len(have)} damaged ones were skipped)" if have else ""))
    step, weights, _ = found
    student = Generator.from_config(student_guidance(teacher.trainable_network(recipe.generator), recipe.objective),
                                    recipe.generator)
    prefix = "ema" if any(k.startswith("ema.") for k in weights) else "generator"
    load_saved_state(student, unprefixed(prefix, weights))
    return student.eval().requires_grad_(False), step


def load_run(path: str | Path, device: torch.device | str | None = None, checkpoint: int | None = None) -> Run:
    """A trained run's recipe, teacher and student (EMA weights when kept), on `device` (default the CPU; sampling and
    evaluation pass parallel.compute_device()). The student is the last iteration's, the watch's best check's with
    train.select=best, or with `checkpoint` the one of that iteration (in checkpoints/ or checkpoints_best/)."""
    path = Path(path)
    run = _load_run(path, checkpoint)
    if device is not None:
        run.teacher.to(device)
        run.student.to(device)
    return run


def _load_run(path: Path, checkpoint: int | None) -> Run:
    if not (path / "recipe.yaml").exists():
        raise MissingFileError(f"{path} is not a training run: no recipe.yaml (train one with `stepdistill train`)")
    recipe = load_recipe(path / "recipe.yaml")
    teacher = build_teacher(recipe.teacher)
    k = recipe.generator.students
    if k > 1 and (path / "students").is_dir():  # (students/k/ itself, opened alone, loads as a single student)
        if checkpoint is not None:
            raise InputError(f"{path} is a run of {k} students: pick one student's checkpoint with --run "
                             f"{student_dir(path, 0)} (students/0 to students/{k - 1}) and --checkpoint {checkpoint}")
        loaded = []
        for i in range(k):
            try:
                loaded.append(_load_generator(student_dir(path, i), recipe, teacher))
            except FileNotFoundError as e:
                raise MissingFileError(f"student {i + 1}/{k} of {path} is not trained yet ({e}): rerun "
                                       "`stepdistill train` with the same recipe and --outdir to finish") from None
        student = MultiStudent([g for g, _ in loaded], teacher.num_classes).eval()
        steps = [s for _, s in loaded]
        return Run(path, recipe, teacher, student, min(steps), steps)
    student, step = _load_generator(path, recipe, teacher, checkpoint)
    return Run(path, recipe, teacher, student, step)
