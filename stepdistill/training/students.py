"""Multi-student distillation (MSD): K ordinary runs, one per block of classes, then the routed ensemble's metrics.

Student k trains in OUTDIR/students/k/ exactly as a single-student run would (its own generator, fake score,
optimisers, checkpoints, warm start / TSM, objective), except that its conditions are drawn uniformly from its own
classes (models/multi_student.py: class c goes to student c * K // num_classes). Students train one after another;
train.iterations and train.max_minutes apply to each. Rerunning the command skips every student whose folder has a
train_summary.json and resumes the first unfinished one from its newest checkpoint. OUTDIR then gets the recipe,
samples/final.png and metrics.json of the ensemble, which `stepdistill sample | eval | export` load like any run.
`train` is the entry for every recipe: one Trainer, or the K students; this module sits above train/trainer.py.
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from .. import parallel
from .. import recipe as recipe_mod
from ..models.multi_student import describe, partition
from ..recipe import Recipe
from ..run import load_run, student_dir
from ..teachers import build_teacher
from .build import check_generator
from .resume import check_resumable, locked
from .trainer import Trainer


def train(recipe: Recipe, outdir: str | Path, quiet: bool = False) -> dict | None:
    """Train (or resume) a run in `outdir`; returns the metrics written to metrics.json (None if eval.at_end is off).
    With generator.students = K > 1, K ordinary runs in outdir/students/k/ and the routed ensemble's metrics."""
    parallel.init()
    if recipe.generator.students != 1:
        return train_students(recipe, outdir, quiet=quiet)
    return Trainer(recipe, outdir, quiet=quiet).run()


def train_students(recipe: Recipe, outdir: str | Path, quiet: bool = False) -> dict | None:
    """Train (or resume) the K students of an MSD recipe in outdir/students/k/; returns the ensemble's metrics
    (None if eval.at_end is off)."""
    outdir = Path(outdir)
    quiet = quiet or not parallel.is_main()
    teacher = build_teacher(recipe.teacher)
    check_generator(recipe, teacher)
    with locked(outdir):
        return _train_students(recipe, teacher, outdir, quiet)


def _train_students(recipe: Recipe, teacher, outdir: Path, quiet: bool) -> dict | None:
    from ..eval.harness import evaluate, write_metrics
    from ..eval.samples import write_samples

    main = parallel.is_main()
    check_resumable(outdir, recipe)
    parallel.barrier()
    if main:
        (outdir / "recipe.yaml").write_text(recipe_mod.dump(recipe))
    groups = partition(teacher.num_classes, recipe.generator.students)
    summaries = []
    for k, classes in enumerate(groups):
        folder = student_dir(outdir, k)
        name = f"student {k + 1}/{len(groups)}: {describe(classes)}"
        done = folder / "train_summary.json"
        if done.exists():
            _say(f"{name}: already trained in {folder}, skipped", quiet)
        else:
            _say(f"{name} -> {folder}", quiet)
            Trainer(recipe, folder, quiet=quiet, classes=classes).run()
        summaries.append({"student": k, "classes": classes, **json.loads(done.read_text())})
    run = load_run(outdir, parallel.compute_device())
    if main:
        (outdir / "train_summary.json").write_text(json.dumps({"students": summaries}, indent=2))
        write_samples(run.teacher, run.student, outdir, recipe.train.seed, "final")
    if not recipe.eval.at_end:
        return None
    _say(f"evaluating the {len(groups)} students, each sample routed to its class's student", quiet)
    metrics = evaluate(recipe, run.teacher, run.student, quiet=quiet)
    if main:
        write_metrics(outdir, metrics)
    return metrics


def _say(text: str, quiet: bool) -> None:
    if not quiet:
        tqdm.write(text)
