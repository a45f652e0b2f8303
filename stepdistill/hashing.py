"""SHA-256 of files, streamed (checkpoints, weights and reference sets are hashed into manifests and protocols), of
tensors and of the package's own source (keys of what is cached)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def update_with_tensor(h, t: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes (any dtype, any device) to the hash `h`."""
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def source_sha256() -> str:
    """Of every .py file of this package: a cached result keyed by it is recomputed after any code change."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()
