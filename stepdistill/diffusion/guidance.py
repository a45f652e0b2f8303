"""Classifier-free guidance in the canonical form."""
from __future__ import annotations

from .parametrization import Prediction


def cfg_combine(uncond: Prediction, cond: Prediction, scale: float) -> Prediction:
    """x0 = x0_u + w (x0_c - x0_u), likewise eps. Both are affine in the network output at the same x_t, so guiding
    in x0 or eps space is the same guidance (unlike guiding v or flow outputs with a time-dependent mix)."""
    return Prediction(uncond.x0 + scale * (cond.x0 - uncond.x0), uncond.eps + scale * (cond.eps - uncond.eps))
