"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files, no download).

The bundled teacher works at 16x16: each 28x28 image is zero-padded to 32x32 and average-pooled 2x2.
Pooling (rather than interpolation) keeps the mapping exact and identical everywhere it is used: teacher
training, classifier training and the reference statistics of the test set.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, MissingFileError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
RESOLUTION = 16
# The last VAL_SIZE training images are held out as the validation split: settings and checkpoints are chosen on it,
# the test set only scores. The "fit" split (the rest) is what students see as real data (GAN terms, f-divergences).
VAL_SIZE = 10_000


def _root(root: str | os.PathLike | None) -> Path:
    path = Path(root or os.environ.get("STEPDISTILL_FASHION_ROOT", DEFAULT_ROOT))
    if not (path / "train-images-idx3-ubyte.gz").exists():
        raise MissingFileError(
            f"Fashion-MNIST not found in {path}. Install it with `apt-get install -y dataset-fashion-mnist` "
            "(as root) or point STEPDISTILL_FASHION_ROOT at a folder holding the four IDX .gz files.")
    return path


def load_raw(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 28, 28), labels int64 (N,)) for split 'train' (60k) or 'test' (10k)."""
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    path = _root(root)
    with gzip.open(path / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(path / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def to_model_space(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 16, 16) float32 in [-1, 1] (pad to 32, average-pool 2x2)."""
    x = torch.as_tensor(np.array(images_uint8)).float().div(127.5).sub(1.0).unsqueeze(1)
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # background is black (-1), so pad with black
    return F.avg_pool2d(x, 2)


def load(split: str = "train", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST in the bundled teacher's space: ((N, 1, 16, 16) in [-1, 1], (N,) labels). Splits: train (60k),
    test (10k), and the training set cut in two: fit (its first 50k) and val (its last VAL_SIZE = 10k)."""
    if split not in ("train", "test", "fit", "val"):
        raise InputError(f"split must be 'train', 'test', 'fit' or 'val', got {split!r}")
    images, labels = load_raw("test" if split == "test" else "train", root)
    part = {"fit": slice(0, len(images) - VAL_SIZE), "val": slice(len(images) - VAL_SIZE, None)}.get(split, slice(None))
    return to_model_space(images[part]), torch.from_numpy(labels[part])
