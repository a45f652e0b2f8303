"""The objective interface: which networks a method needs, which it trains, and with which loss each step."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..models.generator import Generator
from ..models.score import ScoreModel


@dataclass
class Batch:
    """One iteration's inputs: the conditions (None for unconditional teachers) and, for methods that need real
    data, x0. Noise is drawn inside the objective from the global RNG, which checkpoints save and restore."""

    n: int
    cond: torch.Tensor | None = None
    x0: torch.Tensor | None = None


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate into the phase's network
    logs: dict[str, float] = field(default_factory=dict)  # detached values for stats.jsonl / TensorBoard
    samples: torch.Tensor | None = None  # detached generator samples a later phase of this step may reuse


@dataclass
class Phase:
    network: str  # the network this phase updates ("generator", "fake_score", ...)
    loss: Callable[[Batch, torch.Tensor | None], LossOutput]  # (batch, samples from an earlier phase or None)


@dataclass
class Nets:
    """Networks of a run, by role. Absent roles are None."""

    teacher: ScoreModel
    generator: Generator
    fake_score: ScoreModel | None = None

    def get(self, name: str) -> torch.nn.Module:
        net = getattr(self, name)
        if net is None:
            raise KeyError(f"this run has no {name} network")
        return net


class Objective(ABC):
    """One paper's method. Subclasses set `Config` (a dataclass whose `name` is the registered name), `needs` and
    `trains`, and return the step's phases in order."""

    Config: ClassVar[type]
    needs: ClassVar[frozenset[str]] = frozenset({"teacher"})
    trains: ClassVar[tuple[str, ...]] = ("generator",)

    def __init__(self, cfg, nets: Nets, shape: tuple[int, ...]) -> None:
        self.cfg, self.nets, self.shape = cfg, nets, shape  # shape: one sample's shape, (C, H, W) or (D,)

    @abstractmethod
    def phases(self, step: int) -> list[Phase]:
        """The updates of iteration `step` (0-based), in order."""
