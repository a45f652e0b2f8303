"""Atomic, verified checkpoints.

A checkpoint is a folder `checkpoints/step_XXXXXXX/` holding `weights.safetensors` (every network, prefixed by role),
`state.pt` (optimisers, RNG, counters; read back with weights_only=True) and `manifest.json` (the step and the
SHA-256 of each file). It is written under a temporary name and renamed only when complete, so a crash leaves
either the whole checkpoint or none; on load the hashes are checked and a damaged checkpoint is skipped, never used.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..hashing import file_sha256

FILES = ("weights.safetensors", "state.pt")


def save_checkpoint(folder: Path, step: int, weights: dict[str, torch.Tensor], state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically into `folder`, then prune all but the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:07d}"
    tmp = folder / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / FILES[0])
    torch.save(state, tmp / FILES[1])
    manifest = {"step": step, "sha256": {name: file_sha256(tmp / name) for name in FILES}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for name in (*FILES, "manifest.json"):  # make the bytes durable before the rename publishes them
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint folders (with a manifest), oldest first."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.glob("step_*") if (p / "manifest.json").exists())


def verify(path: Path) -> str | None:
    """None if the checkpoint is intact, else a sentence saying what is wrong."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    for name, digest in manifest.get("sha256", {}).items():
        if not (path / name).exists():
            return f"{name} is missing"
        if file_sha256(path / name) != digest:
            return f"{name} does not match its recorded SHA-256 (truncated or modified)"
    return None


def load_latest(folder: Path) -> tuple[int, dict[str, torch.Tensor], dict] | None:
    """(step, weights, state) of the newest intact checkpoint, or None. Damaged ones are reported and skipped."""
    for path in reversed(list_checkpoints(folder)):
        problem = verify(path)
        if problem:
            warnings.warn(f"skipping damaged checkpoint {path}: {problem}", stacklevel=2)
            continue
        step = json.loads((path / "manifest.json").read_text())["step"]
        return step, load_file(path / FILES[0]), torch.load(path / FILES[1], weights_only=True, map_location="cpu")
    return None


def prefixed(prefix: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state_dict.items()}


def unprefixed(prefix: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
