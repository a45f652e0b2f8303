"""Multi-student distillation (MSD; Song, Lorraine, Nie, Kreis, Lucas, ICML 2025): the conditions are split into K
subsets, one student is distilled per subset, and at sampling time each condition is routed to its student.

The partition is fixed and needs no stored table: class c of N goes to student c * K // N, so the students own
contiguous blocks of classes of (nearly) equal size, and every student owns at least one class when K <= N
(10 classes, 4 students: 0-2, 3-4, 5-7, 8-9).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..diffusion.parametrization import Prediction
from ..diffusion.solvers import rollout
from ..errors import InputError
from .generator import Generator, fresh_noise


def student_of(cond: torch.Tensor, students: int, num_classes: int) -> torch.Tensor:
    """(N,) class labels in [0, num_classes) -> (N,) index of the student that serves each: c * K // num_classes."""
    if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= num_classes):
        raise InputError(f"labels must lie in [0, {num_classes}) to be routed to a student, got "
                         f"{sorted(set(cond.tolist()) - set(range(num_classes)))[:5]}; the null (unconditional) label "
                         "has no student: each student only learned its own classes")
    return torch.div(cond.long() * students, num_classes, rounding_mode="floor")


def partition(num_classes: int, students: int) -> list[list[int]]:
    """The classes of each student, in order: [[0, 1, 2], [3, 4], ...] (contiguous, none empty for K <= N)."""
    owner = student_of(torch.arange(num_classes), students, num_classes).tolist()
    return [[c for c in range(num_classes) if owner[c] == k] for k in range(students)]


def describe(classes: list[int]) -> str:
    """'classes 5-7' / 'class 3'."""
    return f"class {classes[0]}" if len(classes) == 1 else f"classes {classes[0]}-{classes[-1]}"


class MultiStudent(nn.Module):
    """K generators behind the Generator interface: `forward(z, cond, steps=None, noise=None)`, `.steps`, `.times`,
    `.schedule`, `.prior`, `.start_t`, `.start_noise`. Each sample is denoised by the student its label routes to,
    inside one shared few-step rollout, so the fresh noise of each step is drawn once for the whole batch, as for a
    single generator."""

    def __init__(self, students: list[Generator], num_classes: int) -> None:
        super().__init__()
        if not students or len({(g.steps, tuple(g.times), g.start_noise) for g in students}) != 1:
            raise ValueError("a MultiStudent needs at least one student, all with the same sampling steps, start time "
                             "and start noise (generator.steps, start_t, start_noise)")
        self.students = nn.ModuleList(students)
        self.num_classes = num_classes

    @property
    def steps(self) -> int:
        return self.students[0].steps

    @property
    def times(self) -> list[float]:
        return self.students[0].times

    @property
    def schedule(self):
        return self.students[0].schedule

    @property
    def start_t(self) -> float:
        return self.students[0].start_t

    @property
    def start_noise(self) -> str:
        return self.students[0].start_noise

    def prior(self, z: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        return self.students[0].prior(z, steps)

    def classes(self) -> list[list[int]]:
        return partition(self.num_classes, len(self.students))

    def routing(self) -> dict:
        """The routing rule as data (written next to exports and into metrics)."""
        return {"students": len(self.students), "num_classes": self.num_classes,
                "rule": "student = label * students // num_classes", "classes": self.classes()}

    def route(self, cond: torch.Tensor | None) -> torch.Tensor:
        """(N,) labels -> (N,) student index."""
        if cond is None:
            raise InputError("a multi-student generator routes each sample by its class label: pass cond, (N,) labels "
                             f"in [0, {self.num_classes})")
        return student_of(cond, len(self.students), self.num_classes)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> Prediction:
        """Prediction(x0, eps) of x_t (N, ...) at t (N,), each row by its own student."""
        which = self.route(cond)
        x0, eps = torch.empty_like(x_t), torch.empty_like(x_t)
        for k in which.unique().tolist():
            rows = (which == k).nonzero()[:, 0].to(x_t.device)
            pred = self.students[k].net(x_t[rows], t[rows], cond[rows])
            x0[rows], eps[rows] = pred.x0.to(x0.dtype), pred.eps.to(eps.dtype)
        return Prediction(x0, eps)

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None, steps: int | None = None,
                noise: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """(N, ...) unit noise and (N,) labels -> (N, ...) samples (Generator.forward, routed per sample)."""
        self.route(cond)  # fail before sampling when cond is missing or out of range
        return rollout(lambda x, t: self.predict(x, t, cond), self.prior(z, steps), self.schedule,
                       self.students[0].times_for(steps), fresh_noise(noise))
