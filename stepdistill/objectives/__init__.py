"""Objectives, one file per paper, registered by name (registry.py finds every module here)."""
from .base import Batch, LossOutput, Nets, Objective, Phase  # noqa: F401
