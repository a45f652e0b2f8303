"""The evaluation harness on the bundled Fashion-MNIST teacher: FD on both sides and the teacher-quality cache."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from stepdistill.eval.domains import fashion_fd
from stepdistill.eval.harness import evaluate, protocol, solver_for_nfe
from stepdistill.recipe import load_recipe
from stepdistill.training.trainer import build

BUNDLED = Path(__file__).resolve().parents[2] / "checkpoints" / "fashion-mnist"
pytestmark = pytest.mark.skipif(not (BUNDLED / "unet").exists(), reason="bundled teacher not present")


def test_solver_for_nfe():
    assert solver_for_nfe(35) == ("heun", 18)
    assert solver_for_nfe(4) == ("euler", 4)
    assert solver_for_nfe(1) == ("euler", 1)
    with pytest.raises(ValueError):
        solver_for_nfe(0)


def test_fd_is_small_for_real_images_and_large_for_noise():
    from stepdistill.data import fashion

    try:
        x, _ = fashion.load("train")
    except FileNotFoundError:
        pytest.skip("dataset-fashion-mnist not installed")
    real = fashion_fd(x[:2000])
    noise = fashion_fd(torch.rand(2000, 1, 16, 16) * 2 - 1)
    assert real < 1.0 < noise


def test_teacher_quality_is_cached_only_for_the_same_protocol(tmp_path):
    folder = tmp_path / "teacher"
    shutil.copytree(BUNDLED, folder, ignore=shutil.ignore_patterns("quality.json"))
    recipe = load_recipe("configs/fashion/vsd_1step.yaml", [f"teacher.path={folder}", "eval.n=200",
                                                              "eval.teacher_nfe=5", "eval.batch_size=200"])
    built = build(recipe)
    fresh = evaluate(recipe, built.teacher, built.nets.generator, quiet=True)
    # Heun, 3 intervals: the step from pure noise (alpha ~ 0) is Euler, the last is Euler: 1 + 2 + 1 evaluations
    assert fresh["teacher"]["nfe"] == 4 and "cached" not in fresh["teacher"]
    assert fresh["student"]["fd"] > 0 and fresh["teacher"]["fd"] > 0
    entry = {"protocol": protocol(recipe, built.teacher), "teacher": {"nfe": 4, "fd": 123.0}}
    (folder / "quality.json").write_text(json.dumps({"entries": [entry]}))
    cached = evaluate(recipe, built.teacher, built.nets.generator, quiet=True)
    assert cached["teacher"]["fd"] == 123.0 and cached["teacher"]["cached"].endswith("quality.json")
    assert cached["student"]["fd"] == pytest.approx(fresh["student"]["fd"])
    other = load_recipe("configs/fashion/vsd_1step.yaml", [f"teacher.path={folder}", "eval.n=200",
                                                             "eval.teacher_nfe=5", "eval.seed=1"])
    assert "cached" not in evaluate(other, built.teacher, built.nets.generator, quiet=True)["teacher"]
