"""Where tensors live: moving a tensor made on the host (random draws, times, labels) to the compute device."""
from __future__ import annotations

import torch


def to_device(x: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """x on `device`. A CPU tensor goes to a GPU through pinned memory without waiting: a copy from pageable memory
    makes the host wait for the GPU's queue to reach it (torch synchronises the stream after such a copy), pinned and
    non-blocking it is queued like a kernel (torch's caching host allocator keeps the pinned buffer until the copy is
    done). Anywhere else this is x.to(device); to the meta device it is marked non-blocking, as the GPU copy is: the
    plan's dry runs (plan.HostSync) flag the copies made without the mark, the ones a GPU would wait for."""
    target = None if device is None else torch.device(device).type
    if target in ("cuda", "meta") and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True) if target == "cuda" else x.to(device, non_blocking=True)
    return x.to(device)
