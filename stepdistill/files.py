"""Where the package caches what it computes once, and how it writes a safetensors file so that a crash never leaves
half of one (exports, cached teacher ODE pairs)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file


def cache_dir() -> Path:
    """$STEPDISTILL_CACHE, default ~/.cache/stepdistill: converted Inception weights, reference statistics, teacher
    ODE pairs."""
    return Path(os.environ.get("STEPDISTILL_CACHE", Path.home() / ".cache" / "stepdistill"))


def write_atomic(tensors: dict, out: Path, metadata: dict | None = None) -> None:
    """save_file to a temporary file beside `out`, then renamed over it: a crash leaves the previous file whole, and
    two processes writing the same file leave one whole copy."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
