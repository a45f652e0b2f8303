"""Every objective's gmm recipe distils the exact Gaussian mixture: it closes at least 90% of the energy-distance
gap between where the student starts (a copy of the teacher: in one step all mass at the mixture's mean; a two-step
student's second step already spreads it) and the teacher's own 35-NFE sampler, and lands within an absolute energy
distance that rules out dropped or merged modes (4096 samples a side). One- and few-step recipes alike. Each trains
in under two minutes on 2 CPU cores; timings are printed, not asserted."""
import time
from pathlib import Path

import pytest
import torch

from stepdistill.eval.harness import generate_student, generate_teacher
from stepdistill.eval.metrics import energy_distance
from stepdistill.recipe import load_recipe
from stepdistill.run import load_run
from stepdistill.training.students import train
from stepdistill.training.trainer import build

MAX_ENERGY_DISTANCE = 0.05  # dropping one of the four modes scores 0.25; every mode twice too wide (std 0.4) 0.015
# Known not to converge yet, each with what was measured (strict: a recipe that starts passing must be moved out).
# Empty since 2026-12-04: gmm_msd, gmm_scm and gmm_sid_2step passed on one CPU and failed on another (their constant-lr
# end states moved with float rounding); with train.lr_decay: cosine they pass on both seeds 0 and 1 here (README).
NOT_YET: dict[str, str] = {}
# The longest (150-220 s each on CI's machine, 2026-12-04), run by `make test-bench` rather than `make test`, which
# must stay under 45 minutes: sCM + LADD (sCM and LADD are each in CI), ASD (VSD's two-step recipe is), TBCM (sCM is).
BENCH = {"gmm_scm_ladd", "gmm_asd_2step", "gmm_tbcm"}


def marks(stem: str) -> list:
    return ([pytest.mark.xfail(strict=True, reason=NOT_YET[stem])] if stem in NOT_YET else []) + (
        [pytest.mark.bench] if stem in BENCH else [])


RECIPES = [pytest.param(str(p), id=p.stem, marks=marks(p.stem)) for p in sorted(Path("configs/toy").glob("gmm_*.yaml"))]


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_closes_the_gap_on_the_gaussian_mixture(path, tmp_path):
    recipe = load_recipe(path, ["train.checkpoint_every=0", "eval.at_end=false"])
    built = build(recipe)  # the student's start: a copy of the teacher (every student of a multi-student run too)
    teacher = built.teacher
    ref = teacher.sample(4096, torch.Generator().manual_seed(1))
    start = energy_distance(generate_student(built.nets.generator, teacher, 4096, 0, 4096), ref)
    ed_teacher = energy_distance(generate_teacher(teacher, 4096, 0, 4096, 35)[0], ref)
    t0 = time.time()
    train(recipe, tmp_path / "run", quiet=True)
    seconds = time.time() - t0
    end = energy_distance(generate_student(load_run(tmp_path / "run").student, teacher, 4096, 0, 4096), ref)
    closed = (start - end) / (start - ed_teacher)
    print(f"{Path(path).stem}: energy distance start {start:.4f}, end {end:.4f}, teacher {ed_teacher:.4f}; "
          f"gap closed {closed:.1%} in {seconds:.0f} s")
    assert closed >= 0.9
    assert end <= MAX_ENERGY_DISTANCE
