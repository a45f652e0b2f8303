import re
from pathlib import Path

import pytest

from stepdistill.recipe import RecipeError, apply_overrides, load_recipe, read_yaml

CONFIGS = sorted(str(p) for p in Path("configs").rglob("*.yaml") if p.parent.name != "bench")
SUITES = sorted(str(p) for p in Path("configs/bench").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS)
def test_every_recipe_validates_and_starts_with_its_command(path):
    recipe = load_recipe(path)
    assert recipe.objective.name and recipe.teacher.name
    first = Path(path).read_text().splitlines()[0]
    command = "plan" if Path(path).parent.name == "plan" else "train"  # plan configs are sized, not trained, here
    assert first.startswith(f"# stepdistill {command} " + path)


@pytest.mark.parametrize("path", SUITES)
def test_every_bench_suite_loads_and_starts_with_its_command(path):
    from stepdistill.bench import load_suite

    suite = load_suite(path)
    assert suite.recipes and all(r in CONFIGS for r in suite.recipes)
    assert Path(path).read_text().splitlines()[0].startswith("# stepdistill bench " + path)


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(RecipeError, match=r"unknown key train\.stpes; allowed in train: iterations"):
        load_recipe("configs/toy/gmm_vsd.yaml", ["train.stpes=3"])
    with pytest.raises(RecipeError, match=r"unknown key objective\.alpha"):
        load_recipe("configs/toy/gmm_vsd.yaml", ["objective.alpha=1.2"])
    with pytest.raises(RecipeError, match="unknown section trian"):
        load_recipe("configs/toy/gmm_vsd.yaml", ["trian.iterations=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(RecipeError, match=r"train\.iterations: expected int, got 'many'"):
        load_recipe("configs/toy/gmm_vsd.yaml", ["train.iterations=many"])
    with pytest.raises(RecipeError, match=r"train\.precision: 'fp16' is not allowed; choose one of 'fp32', 'bf16'"):
        load_recipe("configs/toy/gmm_vsd.yaml", ["train.precision=fp16"])
    with pytest.raises(RecipeError, match=r"teacher\.means\[0\]\[1\]: expected float"):
        load_recipe("configs/toy/gmm_vsd.yaml", ["teacher.means=[[0, x]]"])


def test_unknown_objective_and_teacher_list_the_known_ones():
    known = "asd, disback, fdiv, ladd, scm, sid, tbcm, vsd"
    with pytest.raises(RecipeError, match=f"unknown objective 'dmd9'; known objectives: {known}"):
        load_recipe("configs/toy/gmm_vsd.yaml", ["objective.name=dmd9"])
    with pytest.raises(RecipeError, match="known teachers: diffusers, fashion-mnist, fashion-t2i, gmm, sd"):
        load_recipe("configs/toy/gmm_vsd.yaml", ["teacher.name=sd15"])


def test_overrides_are_parsed_as_yaml():
    data = apply_overrides({}, ["train.iterations=3", "train.lr=1e-3", "teacher.means=[[0,2],[2,0]]",
                                "eval.at_end=false"])
    assert data == {"train": {"iterations": 3, "lr": "1e-3"}, "teacher": {"means": [[0, 2], [2, 0]]},
                    "eval": {"at_end": False}}
    r = load_recipe("configs/toy/gmm_vsd.yaml", ["train.lr=1e-3", "train.iterations=3"])
    assert r.train.lr == 1e-3 and r.train.iterations == 3
    with pytest.raises(RecipeError, match="key=value"):
        apply_overrides({}, ["train.iterations"])



def test_the_old_iteration_keys_still_load_with_a_warning(tmp_path):
    """train.steps, generator.warm_start_steps / tsm_steps and DisBack's record_steps counted iterations; their new
    names say so. Old recipes, overrides and run folders keep working."""
    old = tmp_path / "old.yaml"
    old.write_text(Path("configs/fashion/disback_1step.yaml").read_text()
                   .replace("  iterations:", "  steps:").replace("_iterations:", "_steps:"))
    assert "  steps:" in old.read_text() and "record_steps" in old.read_text()
    new = load_recipe("configs/fashion/disback_1step.yaml")
    with pytest.warns(FutureWarning, match="objective.record_steps is now objective.record_iterations"):
        assert load_recipe(old) == new
    with pytest.warns(FutureWarning, match="generator.tsm_steps is now generator.tsm_iterations"):
        r = load_recipe(old, ["train.steps=7", "generator.tsm_steps=3", "train.iterations=9"])
    assert (r.train.iterations, r.generator.tsm_iterations) == (9, 3)  # the last override of either name wins
    with pytest.warns(FutureWarning):
        assert load_recipe("configs/fashion/disback_1step.yaml", ["train.steps=7"]).train.iterations == 7
    both = apply_overrides(read_yaml(old), ["train.lr=1e-3"])
    both["train"]["iterations"] = 5
    with pytest.raises(RecipeError, match="train.steps and train.iterations are both given: keep train.iterations"):
        with pytest.warns(FutureWarning):
            load_recipe(data=both)

@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("train.log_every=0", "train.log_every must be >= 1, got 0"),
    ("train.iterations=-5", "train.iterations must be >= 0, got -5"),
    ("train.lr=-1", "train.lr must be in (0, 1] (an Adam step moves each weight by about the rate), got -1"),
    ("train.fake_lr=1e38", "train.fake_lr must be in (0, 1]"),
    ("train.lr=.inf", "train.lr must be a finite number, got inf"),
    ("train.ema=1.5", "train.ema must be in [0, 1) (0 disables it), got 1.5"),
    ("train.betas=[0.9]", "train.betas must be two numbers in [0, 1), got [0.9]"),
    ("eval.n=0", "eval.n must be >= 1, got 0"),
    ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
    ("eval.metrics=[fid]", "eval.n must be > 2048 with eval.metrics fid"),
    ("generator.width=0", "generator.width must be in (0, 1], got 0"),
    ("train.grad_accum=0", "train.grad_accum must be >= 1, got 0"),
    ("generator.width=0.5", "generator.width=0.5 builds a randomly initialised student"),  # needs tsm_iterations
    ("generator.lora_rank=4 generator.width=0.5 generator.tsm_iterations=10",
     "generator.lora_rank=4: give a rank >= 1"),
    ("objective.update_ratio=0", "objective.update_ratio must be >= 1, got 0"),
])
def test_out_of_range_values_name_the_key_before_anything_runs(override, message):
    """A value of the right type outside its range fails at validation, not as a traceback mid-run or after a whole
    training run (eval.*)."""
    extra = ["eval.n=500"] if "fid" in override else []
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe("configs/toy/gmm_vsd.yaml", [*extra, *override.split()])


def test_the_recipe_key_reference_is_generated_and_current():
    """docs/recipe_keys.md is generated from the dataclasses and the registry (a new objective's keys appear by
    themselves); a fresh interpreter, so nothing another test registered leaks in."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "scripts/recipe_keys.py", "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = Path("docs/recipe_keys.md").read_text()
    assert "| `objective.kappa4` |" in text and "| `train.log_with` |" in text and "## teacher.name: sd" in text
