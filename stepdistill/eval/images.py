"""Image sets for evaluation: folders of image files, built-in datasets, and their reference statistics (npz)."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..data.real import open_npz
from ..errors import InputError, MissingFileError
from .visual import to_uint8

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
DATASETS = ("fashion-mnist",)


def folder_files(folder: str | Path, limit: int | None = None) -> list[Path]:
    """The image files under `folder`, recursively, sorted by path (the order prompts and outputs follow)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS)
    if not files:
        raise InputError(f"no image files ({', '.join(sorted(EXTENSIONS))}) under {folder}")
    return files[:limit] if limit else files


def folder_batches(folder: str | Path, batch_size: int = 100, quiet: bool = True, sizes: set | None = None,
                   files: list[Path] | None = None) -> Iterator[torch.Tensor]:
    """The folder's images as uint8 (B, 3, H, W) batches, read as they are used, so memory holds one batch whatever
    the folder's size. Images of different sizes are allowed (a batch ends where the size changes; Inception resizes
    each image to 299x299); the sizes seen are added to `sizes`. Unreadable files are listed in one error at the
    end, not skipped. `files`: the folder's folder_files, where the caller has listed them already."""
    folder = Path(folder)
    files = folder_files(folder) if files is None else files
    batch, bad = [], []
    for f in tqdm(files, desc=f"reading {folder}", disable=quiet, leave=False):
        try:
            with Image.open(f) as img:
                a = np.asarray(img.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            bad.append(f"{f.name} ({type(e).__name__})")
            continue
        if batch and (len(batch) == batch_size or a.shape != batch[0].shape):
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
            batch = []
        batch.append(a)
        if sizes is not None:
            sizes.add(a.shape[:2])
    if bad:
        raise InputError(f"{len(bad)} unreadable file(s) in {folder}: {', '.join(bad[:5])}"
                         + (" ..." if len(bad) > 5 else "") + "; remove or fix them")
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


def load_folder(folder: str | Path, limit: int | None = None, quiet: bool = True) -> torch.Tensor:
    """Every image file under `folder` (recursively, sorted by path) as one uint8 (N, 3, H, W) tensor, for scores that
    need all images at once (CLIP score); FID and KID stream the folder (folder_batches). All must share one size;
    unreadable files are listed in the error, not skipped."""
    files = folder_files(folder, limit)
    sizes: set = set()
    batches = list(folder_batches(folder, len(files), quiet, sizes, files))
    if len(sizes) > 1:
        ordered = sorted(sizes)
        raise InputError(f"images in {folder} have {len(sizes)} different sizes (e.g. {ordered[0]} and "
                         f"{ordered[-1]}); resize them consistently first")
    return batches[0]


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, C, H, W), rounded as a PNG writer would (so a saved folder scores the
    same)."""
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()


def dataset_images(name: str, split: str = "test") -> torch.Tensor:
    """A built-in dataset at the resolution its bundled teacher generates, as uint8 (N, C, H, W)."""
    if name == "fashion-mnist":
        from ..data import fashion

        return as_uint8(fashion.load(split)[0])
    raise InputError(f"unknown dataset {name!r}; built in: {', '.join(DATASETS)} (or pass a folder)")


def stats_or_none(features: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Gaussian statistics where the set is large enough for a full-rank covariance (N > D), else (None, None):
    such a set still serves KID."""
    from .metrics import gaussian_stats

    return gaussian_stats(features) if len(features) > features.shape[1] else (None, None)


def save_reference(path: str | Path, features: np.ndarray, protocol: dict,
                   stats: tuple[np.ndarray | None, np.ndarray | None] | None = None) -> Path:
    """The features (float32, for KID), mu and sigma (when N > D; `stats` if already computed) and the protocol as
    JSON, written atomically."""
    mu, sigma = stats if stats is not None else stats_or_none(features)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    extra = {} if mu is None else {"mu": mu, "sigma": sigma}
    np.savez(tmp, features=features.astype(np.float32), protocol=np.array(json.dumps(protocol, sort_keys=True)),
             **extra)
    tmp.replace(path)
    return path


def load_reference(path: str | Path, expect: dict | None = None) -> dict:
    """{"mu", "sigma", "features" (or None), "protocol"} from an npz written by `save_reference`, by clean-fid /
    pytorch-fid (mu and sigma only, no protocol) or clean-fid's KID statistics (`feats`: its make_custom_stats writes
    them to a second file). Keys of `expect` that the file records must match."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"reference statistics not found: {path}; make them with `stepdistill eval ref`")
    with open_npz(path, "the reference statistics") as z:
        feats = next((k for k in ("features", "feats") if k in z), None)
        if feats is None and ("mu" not in z or "sigma" not in z):
            raise InputError(f"{path} holds {sorted(z.files)}, expected 'mu' and 'sigma' (or 'features')")
        ref = {"mu": z["mu"].astype(np.float64) if "mu" in z else None,
               "sigma": z["sigma"].astype(np.float64) if "sigma" in z else None,
               "features": z[feats].astype(np.float64) if feats is not None else None,
               "protocol": json.loads(str(z["protocol"])) if "protocol" in z else {}}
    for key, want in (expect or {}).items():
        have = ref["protocol"].get(key)
        if have is not None and have != want:
            raise InputError(f"reference statistics {path} were computed with {key}={have!r}, this evaluation uses "
                             f"{key}={want!r}; recompute them with `stepdistill eval ref` under the same protocol")
    return ref


def reference_key(protocol: dict) -> str:
    return hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:16]
