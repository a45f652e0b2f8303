"""Conversions between what a network predicts and the canonical Prediction(x0, eps).

With x_t = alpha x0 + sigma eps:
  eps   -> x0 = (x_t - sigma eps) / alpha
  x0    -> eps = (x_t - alpha x0) / sigma
  v     (v = alpha eps - sigma x0)   -> x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)
  flow  (u = eps - x0, alpha + sigma = 1) -> x0 = x_t - sigma u, eps = x_t + alpha u
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import InputError
from .schedules import bcast

KINDS = ("eps", "x0", "v", "flow")


class Prediction(NamedTuple):
    """What every network looks like to objectives: the denoised estimate and the noise estimate, same shape as x_t."""

    x0: torch.Tensor
    eps: torch.Tensor


def to_prediction(kind: str, out: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
                  sigma: torch.Tensor) -> Prediction:
    """Convert a network output of `kind` at (x_t, alpha (N,), sigma (N,)) into Prediction(x0, eps), in float32.

    The arithmetic runs in float32 whatever the network's dtype: at the extremes of a schedule (alpha or sigma near 0)
    bf16 loses the small difference the division then amplifies.
    """
    out, x_t = out.float(), x_t.float()
    a, s = bcast(alpha, x_t), bcast(sigma, x_t)
    if kind == "eps":
        return Prediction((x_t - s * out) / a, out)
    if kind == "x0":
        return Prediction(out, (x_t - a * out) / s)
    if kind == "v":
        norm = a * a + s * s
        return Prediction((a * x_t - s * out) / norm, (s * x_t + a * out) / norm)
    if kind == "flow":
        return Prediction(x_t - s * out, x_t + a * out)
    raise InputError(f"unknown prediction kind {kind!r}; expected one of {', '.join(KINDS)}")


def from_prediction(kind: str, pred: Prediction, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_prediction`: the network output of `kind` that encodes `pred` (used for targets and tests)."""
    a, s = bcast(alpha, pred.x0), bcast(sigma, pred.x0)
    if kind == "eps":
        return pred.eps
    if kind == "x0":
        return pred.x0
    if kind == "v":
        return a * pred.eps - s * pred.x0
    if kind == "flow":
        return pred.eps - pred.x0
    raise InputError(f"unknown prediction kind {kind!r}; expected one of {', '.join(KINDS)}")
