"""Real samples for objectives that need them (a GAN discriminator, f-divergence density ratios).

A data source is anything with `sample(n, cond) -> (n, *shape)`: for class-conditional teachers the i-th sample has
label cond[i], so real and generated batches carry the same classes. Draws use the global RNG, which checkpoints save.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, MissingFileError


class TensorData:
    """Samples drawn with replacement from a tensor of examples (and their labels, for conditional teachers)."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        if labels is not None and len(labels) != len(x):
            raise InputError(f"{len(x)} examples but {len(labels)} labels")
        self.x, self.labels = x.float(), labels
        self.by_class = None if labels is None else {int(c): (labels == c).nonzero()[:, 0] for c in labels.unique()}

    def sample(self, n: int, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None or self.by_class is None:
            return self.x[torch.randint(0, len(self.x), (n,))]
        idx = torch.empty(n, dtype=torch.long)
        for c in cond.unique().tolist():
            pool = self.by_class.get(int(c))
            if pool is None:
                raise InputError(f"the real data has no example of class {c}")
            where = (cond == c).nonzero()[:, 0]
            idx[where] = pool[torch.randint(0, len(pool), (len(where),))]
        return self.x[idx]


class FunctionData:
    """Samples from a function of n (e.g. an exact sampler); with labels it is called as fn(n, cond=cond)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def sample(self, n: int, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.fn(n) if cond is None else self.fn(n, cond=cond)


def open_npz(path: Path, what: str):
    """np.load of a user's .npz (`what` names it, e.g. "data.path"); an InputError naming the file when it is not
    a readable .npz (a text file, an empty or truncated download)."""
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{what} {path} is not a readable .npz file ({type(e).__name__}: {e}); give the file "
                         "written by numpy.savez") from None


def load_npz(path: str | Path, shape: tuple[int, ...], conditional: bool) -> TensorData:
    """`data.path`: an .npz with `x` (N, *shape) in the teacher's space (images in [-1, 1]) and, for
    class-conditional teachers, `labels` (N,) ints."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"data.path {p} does not exist; give an .npz with x (N, {', '.join(map(str, shape))})"
                               + (" and labels (N,)" if conditional else ""))
    with open_npz(p, "data.path") as f:
        if "x" not in f:
            raise InputError(f"data.path {p} has no array `x` (found {', '.join(f.files) or 'nothing'})")
        x = torch.from_numpy(f["x"])
        labels = torch.from_numpy(f["labels"]).long() if "labels" in f else None
    if tuple(x.shape[1:]) != tuple(shape):
        raise InputError(f"data.path {p}: x has examples of shape {tuple(x.shape[1:])}, the teacher's are {shape}")
    if conditional and labels is None:
        raise InputError(f"data.path {p}: the teacher is class-conditional, so the file needs `labels` too")
    return TensorData(x, labels)


class PromptMatchedData:
    """Real samples for a text-conditional teacher whose prompts each name a class (the bundled fashion-t2i): a
    condition is matched to the prompt whose encoding it is, and a sample of that prompt's class is drawn, so a GAN
    term sees real images of the prompted item. Matching by encoding keeps the `sample(n, cond)` interface that
    class-conditional sources have (a batch carries encodings, not prompt strings)."""

    def __init__(self, data: TensorData, encodings: torch.Tensor, labels: torch.Tensor) -> None:
        if len(encodings) != len(labels):
            raise InputError(f"{len(encodings)} prompt encodings but {len(labels)} labels")
        self.data, self.keys, self.labels = data, encodings.flatten(1).float(), labels.long()

    def sample(self, n: int, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            return self.data.sample(n)
        dist, idx = torch.cdist(cond.flatten(1).float().cpu(), self.keys).min(dim=1)
        bad = dist > 1e-3 * self.keys.norm(dim=1)[idx]
        if bad.any():
            raise InputError(f"{int(bad.sum())} of {len(cond)} conditions match none of the teacher's prompts "
                             "(real samples are drawn by the class each prompt names)")
        return self.data.sample(n, self.labels[idx])
