"""Latent text-to-image teachers from diffusers Stable Diffusion folders (SD1.x, SD2.x: eps or v prediction).

The teacher denoises VAE latents, conditioned on CLIP text embeddings of prompts from a prompt file; the VAE decodes
samples for grids and image metrics. Training is data-free: only prompts are needed.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..models.loading import REPO_ROOT, _from_pretrained, load_diffusers_score, resolve_path
from ..models.score import ScoreModel
from ..registry import register
from .base import Teacher

SUPPORTED = {"StableDiffusionPipeline": "Stable Diffusion 1.x / 2.x"}
PLANNED = {"StableDiffusionXLPipeline": "SDXL", "StableDiffusion3Pipeline": "SD3", "SanaPipeline": "SANA",
           "FluxPipeline": "FLUX"}


@dataclass
class SDConfig:
    name: str = "sd"
    path: str = ""  # diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or hub id
    prompts: str = ""  # training prompts: .txt (one per line), .csv or .jsonl with a prompt/text/caption column
    eval_prompts: str | None = None  # prompts of sample grids and evaluation (cycled); default: the training prompts
    null: Literal["empty", "zeros"] = "empty"  # unconditional embedding: the encoded "" (SD1.5/2.1) or zeros


def _bundled(path: str) -> Path:
    """A file as given, else relative to the stepdistill checkout (the bundled teachers' `checkpoints/...`)."""
    p = Path(path)
    return p if p.exists() or p.is_absolute() else REPO_ROOT / p


def pipeline_family(where: Path | str) -> str:
    """The pipeline class of a local folder's model_index.json; an error naming the supported families otherwise."""
    if not isinstance(where, Path):
        return "StableDiffusionPipeline"  # a hub id: its loading will say if it is not one
    index = where / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{where} has no model_index.json: teacher sd needs a full diffusers pipeline folder "
                                "(saved with pipeline.save_pretrained)")
    family = json.loads(index.read_text()).get("_class_name", "?")
    if family not in SUPPORTED:
        planned = f" ({PLANNED[family]} support is planned)" if family in PLANNED else ""
        raise ValueError(f"{where} is a {family} folder, which teacher sd does not support yet{planned}; supported: "
                         f"{', '.join(f'{k} ({v})' for k, v in SUPPORTED.items())}")
    return family


@register("teacher", "sd")
class SDTeacher(Teacher):
    """A Stable Diffusion pipeline folder as a latent, text-conditional teacher."""

    Config = SDConfig

    def __init__(self, cfg: SDConfig) -> None:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        from ..data.prompts import read_prompts
        from ..models.codec import VAECodec
        from ..models.conditioning import TextEncoder, warn_truncated

        if not cfg.path:
            raise ValueError("teacher.path is empty: give a Stable Diffusion diffusers folder or hub id")
        if not cfg.prompts:
            raise ValueError("teacher.prompts is empty: give a prompt file (.txt with one prompt per line, or a .csv / "
                             ".jsonl with a prompt column); text-to-image distillation trains on prompts, not images")
        where = resolve_path(cfg.path)
        pipeline_family(where)
        self.cfg = cfg
        self.folder = where if isinstance(where, Path) else None
        self.text = TextEncoder(_from_pretrained(CLIPTokenizer, where, "tokenizer"),
                                _from_pretrained(CLIPTextModel, where, "text_encoder"), cfg.null)
        self.prompts = read_prompts(_bundled(cfg.prompts))
        self.eval_prompts = read_prompts(_bundled(cfg.eval_prompts)) if cfg.eval_prompts else self.prompts
        warn_truncated(self.text, self.prompts, "teacher.prompts")
        if cfg.eval_prompts:
            warn_truncated(self.text, self.eval_prompts, "teacher.eval_prompts")
        score = load_diffusers_score(cfg.path, "unet")
        score.null_cond = self.text.null_embedding()
        self.score = score.requires_grad_(False).eval()
        self.codec = VAECodec(_from_pretrained(AutoencoderKL, where, "vae"))
        c = score.net.config
        self.shape = (c.in_channels, c.sample_size, c.sample_size)

    def sample_cond(self, n: int, generator: torch.Generator | None = None,
                    classes: list[int] | None = None) -> torch.Tensor:
        """(n, L, C) encodings of n prompts drawn uniformly from teacher.prompts."""
        idx = torch.randint(0, len(self.prompts), (n,), generator=generator).tolist()
        return self.text([self.prompts[i] for i in idx])

    def eval_prompt_list(self, n: int) -> list[str]:
        return [self.eval_prompts[i % len(self.eval_prompts)] for i in range(n)]

    def eval_cond(self, n: int, classes: list[int] | None = None) -> torch.Tensor:
        return self.text(self.eval_prompt_list(n))

    def student_network(self, width: float = 1.0) -> ScoreModel:
        if width != 1.0:
            raise ValueError("generator.width < 1 is not supported for sd teachers; use generator.lora_rank for a "
                             "light student")
        return copy.deepcopy(self.score).requires_grad_(True).train()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(x)


@dataclass
class FashionT2IConfig(SDConfig):
    name: str = "fashion-t2i"
    path: str = "checkpoints/fashion-t2i"  # the bundled miniature SD pipeline (see checkpoints/README.md)
    prompts: str = "checkpoints/fashion-t2i/prompts.txt"  # 5 templates x 10 class names
    eval_prompts: str | None = "checkpoints/fashion-t2i/eval_prompts.txt"  # "a photo of a <class>", label order


@register("teacher", "fashion-t2i")
class FashionT2ITeacher(SDTeacher):
    """The bundled text-to-image Fashion-MNIST teacher: scored like the pixel teacher (FD in the bundled classifier's
    space, on VAE-decoded images), since its eval prompts name the classes in label order (balanced labels i % 10)."""

    Config = FashionT2IConfig
    domain = "fashion-mnist"
