"""Domain feature network for Fréchet distances on the bundled Fashion-MNIST (16x16) teacher.

A small CNN classifier trained by `scripts/train_fashion_classifier.py`; its 128-d penultimate activations define
the feature space ("FD" in this project is the Fréchet distance in that space, not Inception FID).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import MissingFileError


class FashionClassifier(nn.Module):
    """(N, 1, 16, 16) images in [-1, 1] -> logits (N, 10); `features` gives the (N, 128) penultimate layer."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())
        self.body = nn.Sequential(block(1, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 128),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, self.num_features), nn.ReLU())
        self.head = nn.Linear(self.num_features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def save_classifier(model: FashionClassifier, folder: str | Path, info: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(info, indent=2))


def load_classifier(folder: str | Path) -> FashionClassifier:
    path = Path(folder) / "model.safetensors"
    if not path.exists():
        raise MissingFileError(f"feature classifier not found at {path}; train it with "
                               "`python scripts/train_fashion_classifier.py --out {folder}`")
    model = FashionClassifier()
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def extract(model: FashionClassifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """(N, 1, 16, 16) in [-1, 1] -> (N, 128) float64 features; images are clamped to [-1, 1] as a PNG would be."""
    if images.ndim != 4 or images.shape[1:] != (1, 16, 16):
        raise ValueError(f"expected images of shape (N, 1, 16, 16), got {tuple(images.shape)}")
    out = [model.features(images[i:i + batch_size].float().clamp(-1, 1)) for i in range(0, len(images), batch_size)]
    return torch.cat(out).double()
