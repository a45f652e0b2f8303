"""A teacher's domain metric is found by the teacher's `domain` name in the registry, so a plug-in teacher with data
of its own brings its metric in the same file: evaluate, the protocol and the pre-training check all use it."""
import pytest

from stepdistill.errors import RecipeError
from stepdistill.eval.domains import DomainMetric
from stepdistill.eval.harness import evaluate
from stepdistill.recipe import load_recipe
from stepdistill.registry import names, register
from stepdistill.training.build import check_eval
from stepdistill.training.trainer import build


@register("domain", "test-mean-norm")
class MeanNorm(DomainMetric):
    min_samples = 50
    what = "the mean-norm test metric"

    def protocol(self, e) -> dict:
        return {"metric": "norm of the sample mean"}

    def score(self, samples, reference) -> dict:
        return {"mean_norm": float(samples.mean(0).norm())}


def test_a_registered_domain_metric_scores_and_checks_its_teacher():
    assert {"gmm", "fashion-mnist", "test-mean-norm"} <= set(names("domain"))
    recipe = load_recipe("configs/toy/gmm_vsd.yaml", ["teacher.hidden=32", "eval.n=64", "eval.teacher_nfe=3"])
    built = build(recipe)
    built.teacher.domain = "test-mean-norm"
    result = evaluate(recipe, built.teacher, built.nets.generator, quiet=True)
    assert result["protocol"]["metric"] == "norm of the sample mean" and result["protocol"]["domain"] == \
        "test-mean-norm"
    assert set(result["student"]) == {"nfe", "mean_norm"} and "baseline" not in result  # no gmm extras
    assert result["ratio"] == pytest.approx(result["student"]["mean_norm"] / result["teacher"]["mean_norm"])
    check_eval(recipe, built.teacher)
    small = load_recipe("configs/toy/gmm_vsd.yaml", ["eval.n=10"])
    with pytest.raises(RecipeError, match="eval.n=10 is too few for the mean-norm test metric: set eval.n to more "
                                          "than 49"):
        check_eval(small, built.teacher)
