"""Objectives, one file per paper, registered by name."""
from . import asd, disback, fdiv, ladd, scm, sid, tbcm, vsd  # noqa: F401
from .base import Batch, LossOutput, Nets, Objective, Phase  # noqa: F401
