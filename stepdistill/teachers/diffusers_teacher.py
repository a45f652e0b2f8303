"""Teachers from diffusers folders: the bundled Fashion-MNIST teacher and any pixel-space UNet folder."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..data.real import TensorData
from ..errors import RecipeError
from ..models.loading import load_diffusers_score, resolve_path
from ..models.score import ScoreModel
from ..registry import register
from .base import Teacher


@dataclass
class DiffusersConfig:
    name: str = "diffusers"
    path: str = ""  # diffusers folder (unet/ + scheduler/) or hub id
    subfolder: str = "unet"


@register("teacher", "diffusers")
class DiffusersTeacher(Teacher):
    """A pixel-space diffusers UNet folder; class-conditional when the UNet has `num_class_embeds`."""

    Config = DiffusersConfig

    def __init__(self, cfg: DiffusersConfig) -> None:
        if not cfg.path:
            raise RecipeError("teacher.path is empty: give a diffusers folder (with unet/ and scheduler/) or a hub id")
        self.cfg = cfg
        self.folder = resolve_path(cfg.path)  # a local folder (a hub id's cached snapshot); may hold quality.json
        score = load_diffusers_score(str(self.folder), cfg.subfolder)
        if score.conditioning == "text" or (self.folder / "vae").is_dir():
            raise RecipeError(f"{cfg.path} is a text-to-image (latent) pipeline, not a pixel-space UNet: use "
                              "teacher.name: sd with teacher.prompts (teacher.name: diffusers takes UNet2DModel "
                              "folders)")
        self.score = score.requires_grad_(False).eval()  # students copy it (Teacher.to moves every module it holds)
        c = score.net.config
        self.shape = (c.in_channels, c.sample_size, c.sample_size)
        self.num_classes = score.null_label if score.conditioning == "class" else None

    def student_network(self, width: float = 1.0) -> ScoreModel:
        """A copy of the teacher; with width < 1 a randomly initialised UNet of the same config with its
        block_out_channels scaled (see `scaled_channels`)."""
        if width == 1.0:
            return copy.deepcopy(self.score).requires_grad_(True).train()
        from diffusers import UNet2DModel

        t = self.score
        if not isinstance(t.net, UNet2DModel):
            raise RecipeError(f"generator.width < 1 supports UNet2DModel teachers, not {type(t.net).__name__}")
        config = {**t.net.config, "block_out_channels": scaled_channels(t.net.config, width)}
        with torch.random.fork_rng(devices=[]):  # building a student must not shift the training run's random stream
            torch.manual_seed(0)
            net = UNet2DModel.from_config(config)
        return t.like(net).train()


def scaled_channels(config, width: float) -> list[int]:
    """block_out_channels times `width`, each rounded to a multiple of the GroupNorm groups (and, for blocks with
    attention, of the attention head size), never below one such multiple."""
    import math

    n = len(config.block_out_channels)
    head = config.get("attention_head_dim") or 1
    out = []
    for i, c in enumerate(config.block_out_channels):
        attn = ("Attn" in config.down_block_types[i] or "Attn" in config.up_block_types[n - 1 - i]
                or (i == n - 1 and config.get("add_attention", True)))
        m = math.lcm(config.norm_num_groups, head) if attn else config.norm_num_groups
        out.append(max(m, round(c * width / m) * m))
    return out


@dataclass
class FashionConfig:
    name: str = "fashion-mnist"
    path: str = "checkpoints/fashion-mnist"  # the bundled teacher (see checkpoints/README.md)


@register("teacher", "fashion-mnist")
class FashionTeacher(DiffusersTeacher):
    """The bundled class-conditional 16x16 Fashion-MNIST teacher; evaluated with the bundled classifier's FD."""

    Config = FashionConfig
    domain = "fashion-mnist"

    def __init__(self, cfg: FashionConfig) -> None:
        super().__init__(DiffusersConfig(path=cfg.path))
        self._data: TensorData | None = None

    def real_data(self) -> TensorData:
        """The Fashion-MNIST training set without its validation split (the first 50k images, with labels), so that
        settings chosen on the validation split were not fitted to it."""
        from ..data import fashion

        if self._data is None:
            self._data = TensorData(*fashion.load("fit"))
        return self._data
