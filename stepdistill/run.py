"""Reopen a training run folder: its recipe, its teacher and its student (EMA weights when the run keeps an EMA)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .models.generator import Generator
from .recipe import Recipe, load_recipe
from .teachers import Teacher, build_teacher
from .train.state import list_checkpoints, load_latest, unprefixed


@dataclass
class Run:
    path: Path
    recipe: Recipe
    teacher: Teacher
    student: Generator
    step: int


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not (path / "recipe.yaml").exists():
        raise FileNotFoundError(f"{path} is not a training run: no recipe.yaml (train one with `stepdistill train`)")
    recipe = load_recipe(path / "recipe.yaml")
    found = load_latest(path / "checkpoints")
    if found is None:
        have = list_checkpoints(path / "checkpoints")
        raise FileNotFoundError(f"no intact checkpoint in {path / 'checkpoints'}"
                                + (f" ({len(have)} damaged ones were skipped)" if have else ""))
    step, weights, _ = found
    teacher = build_teacher(recipe.teacher)
    student = Generator(teacher.student_network(), recipe.generator.steps)
    prefix = "ema" if any(k.startswith("ema.") for k in weights) else "generator"
    student.load_state_dict(unprefixed(prefix, weights))
    return Run(path, recipe, teacher, student.eval().requires_grad_(False), step)
