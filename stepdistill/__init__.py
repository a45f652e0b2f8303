"""stepdistill: distil many-step diffusion models into one- and few-step generators.

Public API:
    load_recipe(path, overrides) -> Recipe
    train(recipe, outdir) -> metrics dict           (rerun to resume)
    load_run(outdir, checkpoint=None) -> Run(recipe, teacher, student, step)
    sample(run, n, seed, steps=None) -> tensor       (N, C, H, W) images in [-1, 1] or (N, D) vectors
    evaluate(run) -> metrics dict
    export_safetensors(run, path), export_diffusers(run, folder)
"""
from __future__ import annotations

__version__ = "0.1.0"


def load_recipe(path=None, overrides=None, data=None):
    from .recipe import load_recipe as _load

    return _load(path, overrides, data)


def train(recipe, outdir, quiet: bool = False):
    from .training.students import train as _train

    return _train(recipe, outdir, quiet=quiet)


def load_run(path, checkpoint: int | None = None):
    from .run import load_run as _load_run

    return _load_run(path, checkpoint=checkpoint)


def sample(run, n: int, seed: int = 0, steps: int | None = None):
    from .eval.harness import generate_student

    return generate_student(run.student, run.teacher, n, seed, batch_size=max(n, 1), steps=steps)


def evaluate(run, recompute_teacher: bool = False):
    from .eval.harness import evaluate as _evaluate

    return _evaluate(run.recipe, run.teacher, run.student, quiet=True, recompute_teacher=recompute_teacher)


def export_safetensors(run, path):
    from .export import export_safetensors as _export

    return _export(run, path)


def export_diffusers(run, folder):
    from .export import export_diffusers as _export

    return _export(run, folder)
