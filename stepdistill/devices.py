"""Where tensors live: moving a tensor made on the host (random draws, times, labels) to the compute device."""
from __future__ import annotations

import torch


def to_device(x: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """x on `device`. A CPU tensor goes to a GPU through pinned memory without waiting: a copy from pageable memory
    makes the host wait for the GPU's queue to reach it (torch synchronises the stream after such a copy), pinned and
    non-blocking it is queued like a kernel (torch's caching host allocator keeps the pinned buffer until the copy is
    done). Anywhere else this is x.to(device)."""
    if device is None or torch.device(device).type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
