"""A toy recipe on a Gaussian mixture it was not tuned on (configs/toy/ring8/overrides.txt: 8 components on a
radius-3 ring, weights proportional to 1..8, std 0.1) must cover the modes, not just score a small energy distance:
at least 90% of 4096 samples near a component (within the radius holding 99% of a component's exact samples) and
every component's mass within 50% of its weight (eval.metrics.mixture_coverage). The recipe trains with its own
settings; only the mixture changes."""
import time
from pathlib import Path

import pytest
import torch

from stepdistill.eval.harness import domain_reference, domain_score, generate_student
from stepdistill.recipe import load_recipe
from stepdistill.run import load_run
from stepdistill.training.students import train

RING8 = [line for line in Path("configs/toy/ring8/overrides.txt").read_text().splitlines()
         if line and not line.startswith("#")]
MIN_NEAR, MAX_MASS_ERROR = 0.90, 0.50
# Known to miss the target today, with what was measured (strict: a recipe that starts passing must be moved out).
NOT_YET: dict[str, str] = {
    "gmm_vsd": "measured at d5d52b2 (vsd.py 0e03fb6, recipe a5407df), 4000 iterations: energy distance 0.0554 but "
               "only 38.2% of samples near a component and component 2 (weight 3/36) off by 88% "
               "(scripts/gmm_coverage.py --outdir /tmp/ring configs/toy/gmm_vsd.yaml)",
}
RECIPES = [pytest.param(f"configs/toy/{stem}.yaml", id=stem,
                        marks=[pytest.mark.xfail(strict=True, reason=NOT_YET[stem])] if stem in NOT_YET else [])
           for stem in ("gmm_vsd",)]


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_covers_the_modes_of_an_untuned_mixture(path, tmp_path):
    torch.set_num_threads(1)  # a 256-wide MLP gains nothing from a second thread; on a shared machine two thrash
    recipe = load_recipe(path, [*RING8, "train.checkpoint_every=0", "eval.at_end=false"])
    t0 = time.time()
    train(recipe, tmp_path / "run", quiet=True)
    run = load_run(tmp_path / "run")
    x = generate_student(run.student, run.teacher, 4096, 0, 4096)
    s = domain_score(run.teacher, x, domain_reference(run.teacher, 4096, 0))
    print(f"{Path(path).stem} on ring8: energy distance {s['energy_distance']:.4f}, near {s['near_share']:.1%}, "
          f"worst mass error {s['worst_mass_error']:.0%} (component {s['worst_component']}), masses "
          f"{[round(m, 3) for m in s['component_mass']]}; {time.time() - t0:.0f} s")
    assert s["near_share"] >= MIN_NEAR
    assert s["worst_mass_error"] <= MAX_MASS_ERROR
