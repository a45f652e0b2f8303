"""Distances between sample sets: Fréchet distance of Gaussian fits, energy distance."""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

from ..errors import InputError


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mean (D,), covariance (D, D)), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise InputError(f"need an (N, D) feature array with N >= 2, got shape {f.shape}")
    if f.shape[0] <= f.shape[1]:
        raise InputError(f"{f.shape[0]} samples cannot give a full-rank covariance in {f.shape[1]} dimensions; "
                         f"use more than {f.shape[1]} samples")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics do not match: means {mu1.shape} vs {mu2.shape}, covariances "
                         f"{sigma1.shape} vs {sigma2.shape}")
    with warnings.catch_warnings():  # ReLU features with dead units make the product singular; handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: regularise as the reference FID code does
        offset = np.eye(len(mu1)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| between (N, D) and (M, D) samples (V-statistic, >= 0)."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: the unbiased MMD^2 with the cubic polynomial kernel (torchmetrics' `poly_mmd`), averaged over `subsets`
    random subsets of min(subset_size, N1, N2) per side; returns (mean, std over subsets)."""
    from torchmetrics.image.kid import poly_mmd

    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise InputError(f"KID needs at least 2 samples per side, got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    a, b = torch.as_tensor(np.asarray(f1, np.float64)), torch.as_tensor(np.asarray(f2, np.float64))
    vals = torch.stack([poly_mmd(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
                        for _ in range(subsets)])
    return float(vals.mean()), float(vals.std())


# ---- mode coverage of a Gaussian mixture with isotropic components -------------------------------------------------
# Energy distance compares whole distributions and weighs far-apart mass most: samples strewn between the components
# or one component's weight off by half can still read "small" next to the collapsed start (everything at the mean).
# These count what a mixture's user cares about: how many samples look like a sample of some component, and whether
# each component got its share.
NEAR_PROBABILITY = 0.99  # an exact sample of a component is "near" it with this probability, in any dimension


def near_radius(dim: int, probability: float = NEAR_PROBABILITY) -> float:
    """Radius r, in units of the components' std, with P(|z| <= r) = probability for z ~ N(0, I_dim): the chi
    distribution's quantile sqrt(chi2.ppf(probability, dim)). A fixed "3 std" would mean 99.7% in 1-D, 98.9% in 2-D
    (1 - exp(-9/2)) and 66% in 8-D, since a D-dim Gaussian's radius grows like sqrt(D); the quantile keeps the same
    meaning in every dimension. 99%: 2.576 in 1-D, 3.035 in 2-D (sqrt(-2 ln 0.01))."""
    import scipy.stats

    if dim < 1 or not 0 < probability < 1:
        raise ValueError(f"need dim >= 1 and 0 < probability < 1, got dim={dim}, probability={probability}")
    return float(np.sqrt(scipy.stats.chi2.ppf(probability, dim)))


def _float64(v) -> np.ndarray:
    return v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float64)


def _mixture_arrays(means, weights, std: float) -> tuple[np.ndarray, np.ndarray]:
    mu = _float64(means)
    if mu.ndim != 2 or len(mu) == 0:
        raise ValueError(f"means must be a non-empty (K, D) array, got shape {mu.shape}")
    w = np.ones(len(mu)) if weights is None else _float64(weights)
    if w.shape != (len(mu),) or (w <= 0).any():
        raise ValueError(f"weights must be {len(mu)} positive numbers, got {w}")
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return mu, w / w.sum()


def mixture_coverage(samples: torch.Tensor | np.ndarray, means, std: float, weights=None,
                     probability: float = NEAR_PROBABILITY) -> dict:
    """How well (N, D) samples cover the mixture sum_k w_k N(mu_k, std^2 I).

    near_share: the share of samples within near_radius(D, probability) * std of some component mean (an exact
    mixture sample scores `probability`, or a little more where components overlap).
    component_mass: mass_k = (near samples whose nearest mean is mu_k) / N, with all N samples in the denominator,
    so samples that are near no component count as mass lost to every component.
    worst_mass_error: max_k |mass_k - w_k| / w_k (relative; exact samples read about 1 - probability plus the
    sampling noise of the smallest component's count, ~ 1 / sqrt(N w_min)); worst_component: that k.
    """
    mu, w = _mixture_arrays(means, weights, std)
    x = _float64(samples).reshape(len(samples), -1)
    if x.shape[1] != mu.shape[1] or len(x) == 0:
        raise ValueError(f"samples of shape {x.shape} do not match means of dimension {mu.shape[1]}")
    d2 = (x * x).sum(1, keepdims=True) - 2 * x @ mu.T + (mu * mu).sum(1)  # (N, K) squared distances
    nearest = d2.argmin(1)
    near = d2[np.arange(len(x)), nearest] <= (near_radius(mu.shape[1], probability) * std) ** 2
    mass = np.bincount(nearest[near], minlength=len(mu)) / len(x)
    err = np.abs(mass - w) / w
    return {"near_share": float(near.mean()), "worst_mass_error": float(err.max()),
            "worst_component": int(err.argmax()), "component_mass": [float(m) for m in mass]}


def mixture_moments(means, std: float, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and covariance of the mixture: m = sum_k w_k mu_k, C = std^2 I + sum_k w_k (mu_k - m)(mu_k - m)^T.
    The single Gaussian N(m, C) is the baseline that knows the data's first two moments and nothing else."""
    mu, w = _mixture_arrays(means, weights, std)
    m = w @ mu
    c = (w[:, None] * (mu - m)).T @ (mu - m) + std ** 2 * np.eye(mu.shape[1])
    return m, c
