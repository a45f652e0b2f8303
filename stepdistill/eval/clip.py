"""CLIP score (100 x the clipped cosine between image and prompt embeddings, averaged) with torchmetrics, from a
local CLIP folder (a `CLIPModel` + `CLIPProcessor` saved with `save_pretrained`). Nothing is downloaded: no package
ships CLIP weights, so the folder must be given."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..errors import InputError, MissingFileError
from ..hashing import file_sha256
from .inception import check_uint8_images

HOW_TO_GET = ("CLIP score needs a local CLIP model folder (config.json, weights, tokenizer and preprocessor files), "
              "e.g. one saved with CLIPModel.save_pretrained + CLIPProcessor.save_pretrained, or a downloaded "
              "openai/clip-vit-large-patch14 snapshot; pass it with --clip PATH (eval --folder) or eval.clip=PATH "
              "(a recipe, eval.metrics clip)")


class _Embeddings(torch.nn.Module):
    """transformers 5's `get_*_features` return a ModelOutput whose `pooler_output` holds the projected embeddings;
    torchmetrics 1.9 expects the tensor itself."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_text_features(*args, **kwargs))


def _tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_score(images: torch.Tensor, prompts: list[str], model_path: str | Path | None,
               batch_size: int = 64) -> float:
    """The CLIP score of uint8 (N, C, H, W) images against their N prompts (what it was scored with: clip_model_id).
    Prompts longer than the text encoder's context are truncated by the processor (CLIP: 77 tokens), as in every
    published CLIP score."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    path = clip_folder(model_path)
    images = check_uint8_images(images)
    if len(prompts) != len(images):
        raise InputError(f"{len(images)} images but {len(prompts)} prompts; CLIP score pairs them one to one")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    weights = _weights(path)
    stamp = tuple((w.stat().st_mtime_ns, w.stat().st_size) for w in weights)
    metric = CLIPScore(model_name_or_path=lambda: _load(path.resolve(), stamp))
    for i in range(0, len(images), batch_size):
        metric.update(images[i:i + batch_size], prompts[i:i + batch_size])
    return float(metric.compute())


@functools.lru_cache(maxsize=1)
def _load(path: Path, stamp: tuple):
    """The model and processor, loaded once for the student's and the teacher's scores (`stamp`: the weights files'
    times and sizes, so a folder rewritten in between is read again)."""
    from transformers import CLIPModel, CLIPProcessor

    return (_Embeddings(CLIPModel.from_pretrained(path, local_files_only=True).eval()),
            CLIPProcessor.from_pretrained(path, local_files_only=True))


def _weights(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))


def clip_folder(model_path: str | Path | None) -> Path:
    """The CLIP model folder, checked to hold a model (a MissingFileError saying how to get one otherwise)."""
    if model_path is None:
        raise MissingFileError(HOW_TO_GET)
    path = Path(model_path)
    if not (path / "config.json").exists():
        raise MissingFileError(f"no CLIP model at {path} (config.json missing); {HOW_TO_GET}")
    return path


def clip_model_id(model_path: str | Path) -> str:
    """The folder's name and its weights' hash: what a CLIP score's protocol records."""
    weights = _weights(clip_folder(model_path))
    sha = file_sha256(weights[0])[:16] if weights else "unknown"
    return f"{Path(model_path).name} (weights sha256 {sha})"
