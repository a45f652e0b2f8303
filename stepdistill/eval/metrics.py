"""Distances between sample sets: Fréchet distance of Gaussian fits, energy distance."""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mean (D,), covariance (D, D)), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need an (N, D) feature array with N >= 2, got shape {f.shape}")
    if f.shape[0] <= f.shape[1]:
        raise ValueError(f"{f.shape[0]} samples cannot give a full-rank covariance in {f.shape[1]} dimensions; "
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
        raise ValueError(f"KID needs at least 2 samples per side, got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    a, b = torch.as_tensor(np.asarray(f1, np.float64)), torch.as_tensor(np.asarray(f2, np.float64))
    vals = torch.stack([poly_mmd(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
                        for _ in range(subsets)])
    return float(vals.mean()), float(vals.std())
