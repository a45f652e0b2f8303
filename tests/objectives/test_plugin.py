"""A new objective is one new file: a recipe's `plugins` imports it, its @register names it, and it trains, resumes
and samples with nothing in the package or the tests edited (the contract tests read its class attributes)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stepdistill.recipe import RecipeError, load_recipe

PLUGIN = '''
"""A throw-away objective: pull the generator's samples toward a constant point."""
from dataclasses import dataclass

from stepdistill.objectives.base import LossOutput, Objective, Phase
from stepdistill.objectives.terms import sample_generator
from stepdistill.registry import register


@dataclass
class ToyPullConfig:
    name: str = "toy_pull"
    target: float = 0.0


@register("objective", "toy_pull")
class ToyPull(Objective):
    Config = ToyPullConfig

    def phases(self, step):
        return [Phase("generator", self.loss)]

    def loss(self, batch, samples):
        x = sample_generator(self, batch, grad=True)
        loss = (x - self.cfg.target).pow(2).mean()
        return LossOutput(loss, {"loss/generator": loss.item()}, x.detach())
'''

RECIPE = '''
plugins: [{plugin}]
teacher: {{name: gmm, means: [[-2.0, 0.0], [2.0, 0.0]], std: 0.2}}
objective: {{name: toy_pull, target: 1.5}}
train: {{iterations: 150, batch_size: 128, lr: 1.0e-2, log_every: 50, checkpoint_every: 100, watch_every: 0}}
eval: {{at_end: false}}
'''


def test_an_objective_in_one_new_file_trains_resumes_and_samples(tmp_path):
    (tmp_path / "toy_pull.py").write_text(PLUGIN)
    (tmp_path / "toy.yaml").write_text(RECIPE.format(plugin=tmp_path / "toy_pull.py"))
    out = tmp_path / "run"
    code = textwrap.dedent(f"""
        import stepdistill
        stepdistill.train(stepdistill.load_recipe({str(tmp_path / 'toy.yaml')!r}, ["train.iterations=100"]),
                          {str(out)!r}, quiet=True)
        stepdistill.train(stepdistill.load_recipe({str(tmp_path / 'toy.yaml')!r}), {str(out)!r}, quiet=True)
        x = stepdistill.sample(stepdistill.load_run({str(out)!r}), 512)
        print(float(x.mean()), float(x.std()))
    """)
    # a fresh interpreter: the registry is global, and this objective must not leak into the other tests
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    mean, std = map(float, done.stdout.split()[-2:])
    assert abs(mean - 1.5) < 0.1 and std < 0.3  # the gmm student started near the mixture (mean 0, spread 2)
    assert "toy_pull.py" in (out / "recipe.yaml").read_text()


def test_a_plugin_that_is_not_a_python_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match=r"plugins: .*missing\.py is not a Python file"):
        load_recipe(None, [f"plugins=[{tmp_path / 'missing.py'}]"], data={"teacher": {"name": "gmm"},
                                                                         "objective": {"name": "vsd"}})
