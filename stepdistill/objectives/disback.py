"""DisBack: Distribution Backtracking.

Zhang et al., "Distribution Backtracking Builds A Faster Convergence Trajectory for Diffusion Distillation" (2024);
SYZhang0805/DisBack (a DMD2 fork). Stage 1 ("degradation recording", `record_iterations` iterations): the generator is
frozen and the fake score, starting from the teacher, is trained on its samples; a snapshot of the fake score every
`record_every` iterations records a path from the teacher's score to the initial generator's. Stage 2: VSD/DMD2,
except that the score the generator is pulled toward walks that path backwards, one snapshot every
`backtrack_every` iterations, from the one before the last (the last is the fake score itself) to the teacher.

The upstream code swaps targets with a `strict=False` load of a state dict whose keys do not match, so its target
never changes; here the snapshot is loaded strictly into a separate frozen copy, and the tests check that the target
really moves.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..errors import RecipeError
from ..models.score import ScoreModel
from ..registry import register
from .base import Phase
from .terms import fake_phase
from .vsd import VSD, VSDConfig


@dataclass
class DisBackConfig(VSDConfig):
    name: str = "disback"
    record_iterations: int = 500  # stage 1 length, in iterations
    record_every: int = 100  # a snapshot of the fake score every this many stage-1 iterations
    backtrack_every: int = 200  # stage-2 iterations spent on each snapshot before moving one back toward the teacher


@register("objective", "disback")
class DisBack(VSD):
    contract_overrides = ("objective.gan_weight=0.01", "objective.record_iterations=2", "objective.record_every=1")
    guided_overrides = ()
    Config = DisBackConfig

    def __init__(self, cfg: DisBackConfig, nets, shape: tuple[int, ...]) -> None:
        super().__init__(cfg, nets, shape)
        if cfg.record_every < 1 or cfg.record_iterations < cfg.record_every or cfg.record_iterations % cfg.record_every:
            raise RecipeError(f"objective.record_iterations ({cfg.record_iterations}) must be a positive multiple of "
                              f"objective.record_every ({cfg.record_every})")
        if cfg.backtrack_every < 1:
            raise RecipeError(f"objective.backtrack_every must be >= 1, got {cfg.backtrack_every}")
        self.path: list[dict[str, torch.Tensor]] = []  # snapshots 1..m (snapshot 0 is the teacher itself)
        self._target: ScoreModel = copy.deepcopy(nets.fake_score).requires_grad_(False)
        self._loaded: int | None = None  # index of the snapshot in self._target
        self.step = 0

    def phases(self, step: int) -> list[Phase]:
        self.step = step
        cfg = self.cfg
        if step <= cfg.record_iterations and step > 0 and step % cfg.record_every == 0 and \
                len(self.path) < step // cfg.record_every:
            self.path.append({k: v.detach().clone() for k, v in self.nets.fake_score.state_dict().items()})
        if step < cfg.record_iterations:  # stage 1: only the fake score moves, toward the frozen initial generator
            return [fake_phase(self, self.fake_loss)]
        return super().phases(step - cfg.record_iterations)

    def target_index(self) -> int:
        """Which snapshot the generator is pulled toward now: m - 1 at the start of stage 2, down to 0 (the teacher).
        Snapshot m is the fake score itself when stage 2 starts, a target with no gradient at all; the reference also
        steps back once before its first load (`ckpt_num -= 100`, then load)."""
        back = max(0, self.step - self.cfg.record_iterations) // self.cfg.backtrack_every
        return max(0, len(self.path) - 1 - back)

    def target(self) -> ScoreModel:
        i = self.target_index()
        if i == 0:
            return self.nets.teacher
        if self._loaded != i:
            self._target.load_state_dict(self.path[i - 1])  # strict: every key must match
            self._loaded = i
        return self._target

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(),
                **{f"path.{i}.{k}": v for i, snap in enumerate(self.path) for k, v in snap.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        path = {k: state.pop(k) for k in list(state) if k.startswith("path.")}
        super().load_state_dict(state)
        snaps: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in path.items():
            _, i, k = key.split(".", 2)
            snaps.setdefault(int(i), {})[k] = v
        self.path = [snaps[i] for i in sorted(snaps)]
        self._loaded = None
