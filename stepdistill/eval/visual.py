"""Pictures people would rather look at than read: sample grids and 2-D scatter plots."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounding as a PNG writer would."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, scale: int = 2, pad: int = 1) -> Path:
    """Tile (N, C, H, W) images in [-1, 1] into one PNG, `nrow` per row, each upscaled `scale`x (nearest)."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    rows = (n + nrow - 1) // nrow
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = arr[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_scatter(samples: torch.Tensor, reference: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Scatter the first two coordinates of (N, D) samples over reference samples (e.g. the exact mixture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ref, smp = reference[:, :2].cpu().numpy(), samples[:, :2].detach().cpu().numpy()
    ax.scatter(ref[:, 0], ref[:, 1], s=2, alpha=0.3, c="tab:gray", label="teacher (exact)")
    ax.scatter(smp[:, 0], smp[:, 1], s=2, alpha=0.5, c="tab:red", label="student")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7, markerscale=4)
    ax.set_aspect("equal")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
