"""A small time-conditioned MLP for vector data (the Gaussian-mixture teacher's students)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..devices import to_device


class TimeFeatures(nn.Module):
    """(N,) times in [0, 1] -> (N, features): sines and cosines at geometric frequencies from 1 to max_freq."""

    def __init__(self, features: int, max_freq: float) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(max_freq), features // 2)),
                             persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float().reshape(-1, 1) * self.freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class MLPDenoiser(nn.Module):
    """(N, D) x_t, (N,) times in [0, 1] and, when `num_classes` is set, (N,) labels -> (N, D) output (interpreted by
    ScoreModel's prediction kind). Labels are embedded (label num_classes, or cond None, is the null label) and
    concatenated to the input."""

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, time_features: int = 32,
                 max_freq: float = 200.0, num_classes: int | None = None) -> None:
        super().__init__()
        self.dim, self.hidden, self.depth, self.time_features = dim, hidden, depth, time_features
        self.max_freq, self.num_classes = max_freq, num_classes
        self.time = TimeFeatures(time_features, max_freq)
        self.label = None if num_classes is None else nn.Embedding(num_classes + 1, time_features)
        inputs = dim + time_features + (0 if num_classes is None else time_features)
        layers: list[nn.Module] = [nn.Linear(inputs, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        features = [x, self.time(t)]
        if self.label is not None:
            if cond is None:
                cond = torch.full((len(x),), self.num_classes, dtype=torch.long, device=x.device)
            features.append(self.label(to_device(cond.long(), x.device)))
        return self.net(torch.cat(features, dim=1))

    def config(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "depth": self.depth, "time_features": self.time_features,
                "max_freq": self.max_freq, "num_classes": self.num_classes}
