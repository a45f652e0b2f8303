"""Mode-coverage metrics of a Gaussian mixture (eval.metrics.mixture_coverage, mixture_moments) on hand-computed cases,
and their place in the gmm domain score, metrics table and baseline."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stepdistill.eval.domains import gmm_baseline
from stepdistill.eval.harness import domain_reference, domain_score, format_table
from stepdistill.eval.metrics import energy_distance, mixture_coverage, mixture_moments, near_radius
from stepdistill.recipe import load_recipe
from stepdistill.teachers import build_teacher

RING8 = [line for line in Path("configs/toy/ring8/overrides.txt").read_text().splitlines()
         if line and not line.startswith("#")]


def test_near_radius_is_the_chi_quantile():
    assert near_radius(2) == pytest.approx(math.sqrt(-2 * math.log(0.01)))  # 2-D: P(|z| > r) = exp(-r^2 / 2)
    assert near_radius(1) == pytest.approx(2.5758, abs=1e-4)  # the two-sided normal 99% point
    assert near_radius(2, 1 - math.exp(-4.5)) == pytest.approx(3.0)  # "3 std" in 2-D holds 98.9%
    assert near_radius(8) == pytest.approx(4.482, abs=1e-3)  # in 8-D "3 std" would hold 66% (chi2.cdf(9, 8) = 0.658)
    with pytest.raises(ValueError):
        near_radius(0)


def test_samples_at_the_means_with_chosen_counts():
    means, w = [[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], [0.1, 0.3, 0.6]
    x = torch.tensor([means[0]] * 10 + [means[1]] * 30 + [means[2]] * 60)
    s = mixture_coverage(x, means, 0.2, w)
    assert s["near_share"] == 1.0 and s["component_mass"] == pytest.approx([0.1, 0.3, 0.6])
    assert s["worst_mass_error"] == pytest.approx(0.0, abs=1e-12)
    x = torch.tensor([means[0]] * 20 + [means[1]] * 30 + [means[2]] * 50)  # component 0 twice its weight
    s = mixture_coverage(x, means, 0.2, w)
    assert s["component_mass"] == pytest.approx([0.2, 0.3, 0.5])
    assert s["worst_mass_error"] == pytest.approx(1.0) and s["worst_component"] == 0  # |0.5 - 0.6| / 0.6 is less
    s = mixture_coverage(torch.tensor([means[2]] * 100), means, 0.2, w)  # one mode only: the others lost entirely
    assert s["near_share"] == 1.0 and s["worst_mass_error"] == pytest.approx(1.0)


def test_samples_between_components_are_not_near_and_count_as_lost_mass():
    means, std = [[-1.0, 0.0], [1.0, 0.0]], 0.1  # default weights: uniform
    x = torch.tensor([[-1.0, 0.0]] * 25 + [[1.0, 0.0]] * 25 + [[0.0, 0.0]] * 50)  # half of them midway
    s = mixture_coverage(x, means, std)
    assert s["near_share"] == pytest.approx(0.5) and s["component_mass"] == pytest.approx([0.25, 0.25])
    assert s["worst_mass_error"] == pytest.approx(0.5)
    r = near_radius(2) * std  # the boundary, in any direction
    inside, outside = r * (1 - 1e-6), r * (1 + 1e-6)
    x = torch.tensor([[-1.0 + inside, 0.0], [1.0, outside], [1.0 - inside / 2 ** 0.5, -inside / 2 ** 0.5]],
                     dtype=torch.float64)
    s = mixture_coverage(x, means, std)
    assert s["near_share"] == pytest.approx(2 / 3) and s["component_mass"] == pytest.approx([1 / 3, 1 / 3])


@pytest.mark.parametrize("dim", [2, 8])
def test_exact_mixture_samples_are_near_with_the_chosen_probability(dim):
    g = torch.Generator().manual_seed(0)
    means = 6 * torch.eye(3, dim)  # 6 std of 1 apart per axis pair: overlap is negligible
    w = torch.tensor([0.2, 0.3, 0.5])
    n = 20000
    k = torch.multinomial(w, n, replacement=True, generator=g)
    x = means[k] + torch.randn(n, dim, generator=g)
    s = mixture_coverage(x, means, 1.0, w)
    assert s["near_share"] == pytest.approx(0.99, abs=4 * math.sqrt(0.99 * 0.01 / n))  # 4 binomial std
    assert s["worst_mass_error"] < 0.05  # 1% outside the radius plus ~1/sqrt(4000) sampling noise
    if dim == 8:  # a fixed 3 std would call a third of the exact samples "far"
        d = (x - means[k]).norm(dim=1)
        assert (d <= 3).double().mean().item() == pytest.approx(0.658, abs=0.02)


def test_mixture_moments_closed_form():
    m, c = mixture_moments([[0.0], [4.0]], 0.5, [1.0, 3.0])  # weights normalised to 0.25, 0.75
    assert m == pytest.approx([3.0]) and np.allclose(c, [[0.25 * 9 + 0.75 * 1 + 0.25]])
    m, c = mixture_moments([[-1.0, 0.0], [1.0, 0.0]], 0.5)
    assert m == pytest.approx([0.0, 0.0]) and np.allclose(c, [[1.25, 0.0], [0.0, 0.25]])


def test_ring8_fitted_gaussian_has_a_good_looking_energy_distance_and_no_coverage():
    """The point of the coverage metrics: on the 8-component ring, one Gaussian with the mixture's exact mean and
    covariance closes over 90% of the energy-distance gap from the collapsed start, yet almost none of its samples
    look like a sample of any component. The teacher's exact samples score ~99% near."""
    teacher = build_teacher(load_recipe("configs/toy/gmm_vsd.yaml", RING8).teacher)
    n = 4096
    ref = domain_reference(teacher, n, 0)
    exact = domain_score(teacher, teacher.sample(n, torch.Generator().manual_seed(5)), ref)
    assert exact["near_share"] == pytest.approx(0.99, abs=0.01) and exact["worst_mass_error"] < 0.35
    assert exact["energy_distance"] < 0.005
    m, c = mixture_moments(teacher.denoiser.means, teacher.denoiser.std, teacher.denoiser.log_w.exp())
    many = gmm_baseline(teacher, 100_000, 0).double().numpy()  # variances ~4: sampling std of each entry ~0.02
    assert many.mean(0) == pytest.approx(m, abs=0.03) and np.allclose(np.cov(many, rowvar=False), c, atol=0.08)
    base_x = gmm_baseline(teacher, n, 0)
    base = domain_score(teacher, base_x, ref)
    start = energy_distance(torch.from_numpy(m).float().expand(n, -1), ref)  # every one-step student's start
    assert base["energy_distance"] < 0.1 * start
    assert base["near_share"] < 0.05 and base["worst_mass_error"] > 0.9


def test_metrics_table_prints_coverage_and_the_baseline():
    row = {"energy_distance": 0.03, "near_share": 0.66, "worst_mass_error": 0.7, "worst_component": 0,
           "component_mass": [0.1, 0.2]}
    metrics = {"student": {"nfe": 1, **row}, "teacher": {"nfe": 34, **row},
               "baseline": {"nfe": "-", "model": "one Gaussian with the mixture's exact mean and covariance", **row},
               "ratio": 1.0, "protocol": {"n": 4096, "seed": 0}}
    text = format_table(metrics)
    assert "near share" in text and "worst mass err" in text and "0.6600" in text
    assert text.splitlines()[3].startswith("gaussian") and "exact mean and covariance" in text
