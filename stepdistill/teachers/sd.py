"""Latent text-to-image teachers from diffusers pipeline folders: Stable Diffusion 1.x/2.x (eps or v prediction),
SDXL (two CLIP encoders, pooled embedding, size/crop time ids), SD3 (an MMDiT flow-matching transformer on two CLIPs
and T5), FLUX (a flow transformer on 2x2 latent patches, T5 and pooled CLIP; dev models take their guidance scale as
an input) and SANA (a linear-attention flow transformer on Gemma, with a DC-AE autoencoder).

The teacher denoises VAE latents, conditioned on the family's text condition (models/conditioning.py) of prompts from
a prompt file; the VAE decodes samples for grids and image metrics. Training is data-free: only prompts are needed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..errors import InputError, MissingFileError, RecipeError
from ..models.loading import (
    bundled_path,
    from_pretrained_locally,
    load_diffusers_score,
    read_json,
    resolve_path,
    score_from_diffusers,
)
from ..models.score import ScoreModel
from ..registry import register
from .base import Teacher

SUPPORTED = {"StableDiffusionPipeline": "Stable Diffusion 1.x / 2.x", "StableDiffusionXLPipeline": "SDXL",
             "StableDiffusion3Pipeline": "SD3", "FluxPipeline": "FLUX", "SanaPipeline": "SANA"}
PLANNED = {"PixArtSigmaPipeline": "PixArt-Sigma", "HunyuanDiTPipeline": "Hunyuan-DiT"}
FAMILY = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3",
          "FluxPipeline": "flux", "SanaPipeline": "sana"}


@dataclass
class SDConfig:
    name: str = "sd"
    # diffusers pipeline folder (model_index.json, unet/ or transformer/, vae/, text encoders) or hub id, or one
    # checkpoint file in the original layout (an A1111 / ComfyUI .safetensors; needs `config`)
    path: str = ""
    config: str | None = None  # with a single-file `path`: the diffusers pipeline folder or hub id of the same model
    #                            whose configs, tokenizers and scheduler describe the file (its weights are not used)
    prompts: str = ""  # training prompts: .txt (one per line), .csv or .jsonl with a prompt/text/caption column
    eval_prompts: str | None = None  # prompts of sample grids and evaluation (cycled); default: the training prompts
    # unconditional condition: the folder's own convention (auto: zeros for SDXL's force_zeros_for_empty_prompt, else
    # the encoded ""), or forced: the encoded "" (SD1.5/2.1/SD3) or all-zero embeddings (SDXL, DMD2)
    null: Literal["auto", "empty", "zeros"] = "auto"
    resolution: int | None = None  # image side in pixels (default: the network's sample size; FLUX: 1024)
    embedded_guidance: float = 3.5  # FLUX-dev: the guidance scale the network takes as an input (its pipeline's
    #                                 guidance_scale); ignored by networks without a guidance embedding


def pipeline_index(where: Path) -> dict:
    """A local folder's model_index.json, checked to be a supported family; an error naming the supported ones."""
    index = where / "model_index.json"
    if not index.exists():
        raise MissingFileError(f"{where} has no model_index.json: teacher sd needs a full diffusers pipeline folder "
                               "(saved with pipeline.save_pretrained)")
    meta = read_json(index)
    family = meta.get("_class_name", "?")
    if not isinstance(family, str) or family not in SUPPORTED:
        planned = f" ({PLANNED[family]} support is planned)" if family in PLANNED else ""
        raise InputError(f"{where} is a {family} folder, which teacher sd does not support yet{planned}; supported: "
                         f"{', '.join(f'{k} ({v})' for k, v in SUPPORTED.items())}")
    return meta


def _text_encoder(where: Path, index: dict, family: str, null: str, width: int | None, pipe=None):
    """The family's tokenizers and text encoders from the folder, or from `pipe` when the teacher is a single file
    (SD3's T5 may be absent: text_encoder_3 null)."""
    import transformers

    def part(name: str):
        spec = index.get(name, ["transformers", "CLIPTokenizer" if "token" in name else "CLIPTextModel"])
        if spec is None or spec[1] is None:
            return None
        if pipe is not None:
            return getattr(pipe, name)
        # a model without hub kernels: transformers 5 swaps in layers from the kernels package when it is installed
        # (peft brings it), which would fetch them online and refuses the meta device of `stepdistill plan`; a
        # transformers that knows no hub kernels would pass the keyword on to the model and fail
        knows = hasattr(transformers.PreTrainedModel, "set_use_kernels") or hasattr(transformers.PreTrainedModel,
                                                                                      "kernelize")
        kw = {"use_kernels": False} if knows and "token" not in name else {}
        return from_pretrained_locally(getattr(transformers, spec[1]), where, name, **kw)

    names = {"sd": ("",), "sana": ("",), "sdxl": ("", "_2"), "flux": ("", "_2"), "sd3": ("", "_2", "_3")}[family]
    from ..models.conditioning import TextEncoder

    return TextEncoder([part("tokenizer" + k) for k in names], [part("text_encoder" + k) for k in names], null,
                       family, width=width, instruction=sana_instruction() if family == "sana" else None)


def load_single_file(pipeline_cls, path: Path, config: Path, family: str):
    """The pipeline of a single original-layout checkpoint file, its configs and tokenizers from the local folder
    `config`, offline (diffusers' own original -> diffusers conversion)."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    extra = dict(safety_checker=None, requires_safety_checker=False) if family == "sd" else {}
    try:
        return pipeline_cls.from_single_file(str(path), config=str(config), local_files_only=True,
                                             torch_dtype=torch.float32, **extra)  # fp32 as a folder, from fp16 too
    except (OSError, ValueError, KeyError, SingleFileComponentError) as e:
        raise InputError(f"could not load teacher.path={str(path)!r} as a {pipeline_cls.__name__} checkpoint with "
                         f"teacher.config={str(config)!r}: is it that model's file? ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def sana_instruction() -> list[str]:
    """The complex human instruction SanaPipeline prepends to every prompt by default (read from its signature, so
    it is exactly the installed diffusers' text)."""
    import inspect

    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


@register("teacher", "sd")
class SDTeacher(Teacher):
    """A Stable Diffusion (1.x/2.x, XL or 3), FLUX or SANA pipeline folder as a latent, text-conditional teacher."""

    Config = SDConfig

    def __init__(self, cfg: SDConfig) -> None:
        import diffusers

        from ..data.prompts import read_prompts
        from ..models.codec import VAECodec
        from ..models.conditioning import warn_truncated

        if not cfg.path:
            raise RecipeError("teacher.path is empty: give a Stable Diffusion diffusers folder or hub id")
        if not cfg.prompts:
            raise RecipeError("teacher.prompts is empty: give a prompt file (.txt with one prompt per line, or a "
                              ".csv / .jsonl with a prompt column); text-to-image distillation trains on prompts, not "
                              "images")
        single = bundled_path(cfg.path)
        self.single_file = single if single.is_file() else None  # a checkpoint file in the original layout
        if self.single_file is None and single.suffix in (".safetensors", ".ckpt"):
            raise MissingFileError(f"teacher.path={cfg.path!r}: no such checkpoint file (looked at {single.resolve()})")
        if self.single_file is None and cfg.config:
            raise InputError(f"teacher.config={cfg.config!r} describes a single-file teacher.path, but "
                             f"teacher.path={cfg.path!r} is not a file: drop teacher.config")
        if self.single_file is not None and not cfg.config:
            raise InputError(f"teacher.path={cfg.path!r} is a single checkpoint file: also give teacher.config=<the "
                             "diffusers pipeline folder or hub id of the same model> for its configs and tokenizer")
        where = resolve_path(cfg.config or cfg.path)
        index = pipeline_index(where)
        self.cfg, self.pipeline = cfg, index["_class_name"]
        self.family = FAMILY[self.pipeline]
        self.denoiser = "unet" if self.family in ("sd", "sdxl") else "transformer"  # the pipeline's component name
        self.folder = where  # a local folder (a hub id's cached snapshot): LoRA exports fingerprint its weights
        #                      (a single-file teacher's: its config folder, whose weights are not used)
        pipe = None
        if self.single_file is not None:
            pipe = load_single_file(getattr(diffusers, self.pipeline), self.single_file, where, self.family)
            score = score_from_diffusers(getattr(pipe, self.denoiser), pipe.scheduler)
        else:
            score = load_diffusers_score(str(where), self.denoiser)
        null = cfg.null if cfg.null != "auto" else (
            "zeros" if self.family == "sdxl" and index.get("force_zeros_for_empty_prompt", True) else "empty")
        width = score.net.config.joint_attention_dim if self.family == "sd3" else None
        self.text = _text_encoder(where, index, self.family, null, width, pipe)
        self.prompts = read_prompts(bundled_path(cfg.prompts))
        self.eval_prompts = read_prompts(bundled_path(cfg.eval_prompts)) if cfg.eval_prompts else self.prompts
        warn_truncated(self.text, self.prompts, "teacher.prompts")
        if cfg.eval_prompts:
            warn_truncated(self.text, self.eval_prompts, "teacher.eval_prompts")
        vae_cls = getattr(diffusers, index.get("vae", ["diffusers", "AutoencoderKL"])[1])  # SANA: AutoencoderDC
        self.codec = VAECodec(pipe.vae if pipe is not None else from_pretrained_locally(vae_cls, where, "vae"))
        c, factor = score.net.config, self.codec.factor
        size = cfg.resolution or (1024 if self.family == "flux" else c.sample_size * factor)
        if size % (2 * factor if self.family == "flux" else factor):
            raise RecipeError(f"teacher.resolution={size} must be a multiple of {factor} (the VAE's downsampling"
                              f"{' x 2 for FLUX patches' if self.family == 'flux' else ''})")
        channels = c.in_channels // 4 if self.family == "flux" else c.in_channels  # FLUX: 2x2 patches of latents
        self.shape = (channels, size // factor, size // factor)
        score.null_cond = self.text.null_embedding()
        if self.family == "sdxl":  # micro-conditioning: original size, crop top-left, target size, in pixels
            score.time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32)
        if self.family == "flux":
            score.guidance_input = cfg.embedded_guidance
        self.score = score.requires_grad_(False).eval()

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
            raise RecipeError("generator.width < 1 is not supported for sd teachers; use generator.lora_rank for a "
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

    def __init__(self, cfg: FashionT2IConfig) -> None:
        super().__init__(cfg)
        self._data = None

    def real_data(self):
        """Fashion-MNIST's fit split (the pixel teacher's real data: the validation split left out) in this teacher's
        latent space, drawn by the class each condition's prompt names (data.real.PromptMatchedData): real data for
        DMD2's GAN term. The prompts must be the bundled ones' (a template around a class name)."""
        from ..data import fashion
        from ..data.real import PromptMatchedData, TensorData
        from .fashion_t2i_train import training_prompts

        if self._data is None:
            label_of = dict(training_prompts())  # every template and class (the eval prompts' template among them)
            unknown = [p for p in self.prompts if p not in label_of]
            if unknown:
                raise InputError(f"teacher.prompts holds {len(unknown)} prompts that name no Fashion-MNIST class in "
                                 f"the bundled templates (e.g. {unknown[0]!r}), so no real image matches them: use "
                                 "the bundled prompts.txt for an objective that needs real data")
            x, labels = fashion.load("fit")
            with torch.no_grad():
                latents = torch.cat([self.codec.encode(b) for b in x.split(1000)])
            self._data = PromptMatchedData(TensorData(latents, labels), self.text(self.prompts),
                                           torch.tensor([label_of[p] for p in self.prompts]))
        return self._data
