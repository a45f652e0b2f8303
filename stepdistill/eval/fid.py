"""FID and KID of uint8 image sets against reference statistics, with the protocol written beside every score."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..files import cache_dir
from .images import (
    dataset_images,
    folder_batches,
    folder_files,
    load_reference,
    reference_key,
    save_reference,
    stats_or_none,
)
from .inception import InceptionFeatures
from .metrics import frechet_distance, gaussian_stats, kernel_inception_distance

IMAGE_METRICS = ("fid", "kid")


def reference_protocol(features: InceptionFeatures, source: str, n: int, resolution: str) -> dict:
    return {**features.protocol(), "reference": source, "reference_n": n, "resolution": resolution}


def resolution(sizes) -> str:
    """"HxW", or the sizes seen in a mixed folder (each image is resized to 299x299 on its own)."""
    return ", ".join(f"{h}x{w}" for h, w in sorted(sizes))


def folder_features(folder: str | Path, features: InceptionFeatures, quiet: bool = True,
                    files: list[Path] | None = None) -> tuple[np.ndarray, str]:
    """(Inception features, resolution) of an image folder, read batch by batch: memory holds one batch of images.
    `files`: its folder_files, where the caller has listed them already."""
    files = folder_files(folder) if files is None else files
    sizes: set = set()
    f = features.stream(folder_batches(folder, features.batch_size, quiet=True, sizes=sizes, files=files),
                        desc=f"Inception features of {folder}", quiet=quiet, total=len(files))
    return f, resolution(sizes)


def reference_from_features(f: np.ndarray, proto: dict, out: str | Path | None = None) -> dict:
    """Reference statistics of features (written to `out` when given: mu and sigma as clean-fid's and pytorch-fid's
    statistics files hold them, plus the features for KID and the protocol)."""
    mu, sigma = stats_or_none(f)
    if out is not None:
        save_reference(out, f, proto, stats=(mu, sigma))
    return {"mu": mu, "sigma": sigma, "features": f, "protocol": proto}


def reference_from_images(images: torch.Tensor, features: InceptionFeatures, source: str,
                          out: str | Path | None = None, quiet: bool = True) -> dict:
    """Reference statistics of uint8 `images` (written to `out` when given)."""
    f = features(images, desc=f"Inception features of {source}", quiet=quiet)
    proto = reference_protocol(features, source, len(images), resolution([tuple(images.shape[2:])]))
    return reference_from_features(f, proto, out)


def reference_from_folder(folder: str | Path, features: InceptionFeatures, out: str | Path | None = None,
                          quiet: bool = True) -> dict:
    f, res = folder_features(folder, features, quiet)
    return reference_from_features(f, reference_protocol(features, f"folder {folder}", len(f), res), out)


def reference_for(spec: str, features: InceptionFeatures, quiet: bool = True, split: str = "test") -> dict:
    """Reference statistics from an npz file (ours, or clean-fid's / pytorch-fid's mu and sigma), an image folder
    (streamed), or a built-in dataset name (computed once per protocol and cached under $STEPDISTILL_CACHE/refs)."""
    path = Path(spec)
    if path.suffix == ".npz":
        return load_reference(path, expect=features.protocol())
    if path.is_dir():
        return reference_from_folder(path, features, quiet=quiet)
    images = dataset_images(spec, split)
    source = f"{spec} {split} split ({len(images)} images)"
    proto = reference_protocol(features, source, len(images), resolution([tuple(images.shape[2:])]))
    cached = cache_dir() / "refs" / f"{spec}_{split}_{reference_key(proto)}.npz"
    if cached.exists():
        return load_reference(cached, expect=features.protocol())
    return reference_from_images(images, features, source, out=cached, quiet=quiet)


def image_scores(images: torch.Tensor, reference: dict, features: InceptionFeatures,
                 metrics: tuple[str, ...] = IMAGE_METRICS, kid_subset_size: int = 1000, seed: int = 0,
                 quiet: bool = True, desc: str = "Inception features") -> dict:
    """{"fid", "kid", "kid_std"} (those asked for) of uint8 images against `reference`."""
    check_metrics(metrics)
    return feature_scores(features(images, desc=desc, quiet=quiet), reference, metrics, kid_subset_size, seed)


def check_metrics(metrics: tuple[str, ...]) -> None:
    unknown = set(metrics) - set(IMAGE_METRICS)
    if unknown:
        raise InputError(f"unknown image metric(s) {sorted(unknown)}; choose from {', '.join(IMAGE_METRICS)}")


def feature_scores(f: np.ndarray, reference: dict, metrics: tuple[str, ...] = IMAGE_METRICS,
                   kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """{"fid", "kid", "kid_std"} (those asked for) of Inception features against `reference`."""
    check_metrics(metrics)
    out = {}
    if "fid" in metrics:
        if reference["mu"] is None:
            raise InputError(f"the reference set has {len(reference['features'])} images, too few for FID's "
                             f"{f.shape[1]}-d covariance; use more than {f.shape[1]} reference images (KID works)")
        mu, sigma = gaussian_stats(f)
        out["fid"] = frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
    if "kid" in metrics:
        if reference.get("features") is None:
            raise InputError("KID needs the reference features, but these reference statistics hold only mu and "
                             "sigma; recompute them with `stepdistill eval ref` (it stores the features)")
        out["kid"], out["kid_std"] = kernel_inception_distance(f, np.asarray(reference["features"]),
                                                               subset_size=kid_subset_size, seed=seed)
    return out
