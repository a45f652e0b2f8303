"""Objectives, one file per paper, registered by name."""
from . import disback, fdiv, scm, sid, vsd  # noqa: F401
from .base import Batch, LossOutput, Nets, Objective, Phase  # noqa: F401
