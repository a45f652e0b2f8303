"""The objective interface: which networks a method needs, which it trains, and with which loss each step."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..models.generator import Generator
from ..models.score import ScoreModel, device_of, move_modules, warm_start_guidance


@dataclass
class Batch:
    """One iteration's inputs: the conditions (None for unconditional teachers) and, for methods that need real
    data, x0. Noise is drawn inside the objective from the global RNG, which checkpoints save and restore."""

    n: int
    cond: torch.Tensor | None = None
    x0: torch.Tensor | None = None

    def split(self, k: int) -> list[Batch]:
        """k micro-batches of consecutive rows (k divides n)."""
        m = self.n // k
        part = lambda t, i: None if t is None else t[i * m:(i + 1) * m]  # noqa: E731
        return [Batch(m, part(self.cond, i), part(self.x0, i)) for i in range(k)]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate into the phase's network
    # detached tensors (or numbers) for stats.jsonl / TensorBoard: read back only at log steps, never in the iteration
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)
    samples: torch.Tensor | None = None  # detached generator samples a later phase of this step may reuse


@dataclass
class Phase:
    network: str | tuple[str, ...]  # the network(s) this phase updates ("generator", ("fake_score", "discriminator"))
    loss: Callable[[Batch, torch.Tensor | None], LossOutput]  # (batch, samples from an earlier phase or None)

    @property
    def networks(self) -> tuple[str, ...]:
        return (self.network,) if isinstance(self.network, str) else tuple(self.network)


@dataclass
class Nets:
    """Networks of a run, by role. Absent roles are None."""

    teacher: ScoreModel
    generator: Generator
    fake_score: ScoreModel | None = None
    discriminator: torch.nn.Module | None = None  # heads on the fake score's or the teacher's features

    def get(self, name: str) -> torch.nn.Module:
        net = getattr(self, name)
        if net is None:
            raise KeyError(f"this run has no {name} network")
        return net


TRAINABLE = ("generator", "fake_score", "discriminator")


class Objective(ABC):
    """One paper's method. Subclasses set `Config` (a dataclass whose `name` is the registered name) and `needs`
    (or override `needs_for` when a setting adds requirements), and return each iteration's phases in order.

    Requirements: "teacher", "fake_score", "discriminator" (networks) and "data" (real samples in Batch.x0). The
    generator is always trained; so is every other network named in the requirements except the teacher. A
    discriminator is a head on the fake score's bottleneck, or with `discriminator_on = "teacher"` LADD's heads on
    the frozen teacher's features (models/discriminator.py)."""

    Config: ClassVar[type]
    needs: ClassVar[frozenset[str]] = frozenset({"teacher"})
    discriminator_on: ClassVar[str] = "fake_score"  # or "teacher"
    # Overrides that switch on every optional network and term, and the guidance settings for a class-conditional
    # teacher: tests/objectives/test_contract.py runs every registered objective's contract with them, so a new
    # objective needs no test edit (and gets its defaults checked without them).
    # True for consistency models: their students may be sampled with more steps than trained (the few-step rule),
    # so exports let a pipeline ask for any number of steps; other students' exports allow only the trained K.
    multistep: ClassVar[bool] = False
    contract_overrides: ClassVar[tuple[str, ...]] = ()
    guided_overrides: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def needs_for(cls, cfg) -> frozenset[str]:
        return cls.needs

    @classmethod
    def warm_start_guidance(cls, cfg) -> float:
        """The teacher's guidance scale for the regression warm start's ODE pairs: the distribution the generator
        is trained toward. By default the config's `guidance_scale` (1 without one), or the scale a student with an
        embedded guidance set exports at; objectives that keep the teacher's scale under another name override it."""
        return warm_start_guidance(cfg)

    def __init__(self, cfg, nets: Nets, shape: tuple[int, ...]) -> None:
        self.cfg, self.nets, self.shape = cfg, nets, shape  # shape: one sample's shape, (C, H, W) or (D,)
        needs = self.needs_for(cfg)
        self.uses_data = "data" in needs
        self.trains = tuple(n for n in TRAINABLE if n == "generator" or n in needs)
        self.keeps_pairs = False  # trains on the warm start's teacher ODE pairs: the loop sets self.pairs (vsd)

    @property
    def device(self) -> torch.device:
        """Where the networks compute: noise and per-sample times are drawn for there (parallel.randn, uniform_t)."""
        return device_of(self.nets.generator)

    def to(self, device: torch.device) -> Objective:
        """Move the modules the objective owns (sCM's adaptive weight, DisBack's target copy) to `device`."""
        move_modules(self, device)
        return self

    def parameters(self, network: str) -> list[torch.nn.Parameter]:
        """Trainable parameters the objective owns that `network`'s optimiser updates with it (sCM's adaptive
        weight trains with the generator); save them through state_dict."""
        return []

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors the objective keeps between iterations (saved with checkpoints for exact resume)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:  # noqa: B027 (optional hook, no state here)
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint has {sorted(state)[:3]}")

    @abstractmethod
    def phases(self, step: int) -> list[Phase]:
        """The updates of iteration `step` (0-based), in order."""
