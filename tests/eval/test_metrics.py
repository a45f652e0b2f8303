import numpy as np
import pytest
import torch

from stepdistill.eval.metrics import energy_distance, frechet_distance, gaussian_stats


def _fd_reference(f1, f2):
    """Independent FD: the matrix square root through an eigendecomposition of S1^(1/2) S2 S1^(1/2)."""
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_frechet_distance_agrees_with_independent_computation():
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(3000, 16))
    f2 = rng.normal(size=(3000, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    got = frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
    assert got == pytest.approx(_fd_reference(f1, f2), rel=1e-6)
    assert frechet_distance(*gaussian_stats(f1), *gaussian_stats(f1)) == pytest.approx(0.0, abs=1e-6)


def test_gaussian_stats_needs_more_samples_than_dimensions():
    with pytest.raises(ValueError, match="more than 16 samples"):
        gaussian_stats(np.zeros((10, 16)))


def test_energy_distance_separates_distributions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, 2, generator=g), torch.randn(2000, 2, generator=g)
    assert energy_distance(a, b) < 0.01
    assert energy_distance(a, b + 1.0) > 0.5
