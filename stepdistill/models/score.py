"""ScoreModel: any denoising network + its schedule + its prediction kind -> predict(x_t, t, cond) = (x0, eps).

This is the boundary of the canonical form. Everything beyond it (objectives, solvers, the trainer) sees canonical
time t in [0, 1] and Prediction(x0, eps), whatever the backbone predicts and however it counts time.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from ..devices import to_device
from ..diffusion.guidance import cfg_combine
from ..diffusion.parametrization import KINDS, Prediction, to_prediction
from ..diffusion.schedules import Schedule
from ..errors import InputError, RecipeError
from .backbones import backbone_of

Conditioning = Literal["none", "class", "text"]


def device_of(module: nn.Module) -> torch.device:
    """The device a module computes on: its first parameter's or buffer's (the CPU when it has none)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def held_modules(owner: object) -> list[nn.Module]:
    """The nn.Module attributes of a plain object (a teacher, an objective): what move_modules moves."""
    return [value for value in vars(owner).values() if isinstance(value, nn.Module)]


def move_modules(owner: object, device: torch.device) -> None:
    """Move every nn.Module attribute of a plain object (a teacher, an objective) to `device`."""
    for module in held_modules(owner):
        module.to(device)


class ScoreModel(nn.Module):
    """Wraps `net`, any network a backbone adapter knows how to call (models/backbones/: diffusers UNets, SD3, FLUX
    and SANA transformers, the MLPDenoiser), or a plain net(x, t[, cond]).

    cond: None for unconditional nets; (N,) int64 labels for class-conditional ones (label `null_label` means
    unconditional); (N, L, C) text conditions for cross-attention nets (`null_cond` is the unconditional one), whose
    last row holds the pooled embedding for SDXL UNets and SD3 transformers (models/conditioning.py); SDXL's
    micro-conditioning `time_ids` (original size, crop, target size) are fixed per teacher and kept here, as is
    `guidance_input`, the guidance scale of networks that take it as an input (not classifier-free guidance): FLUX-dev,
    and students given a guidance embedding (`embed_guidance`). It is a float, or while training (`guidance_inputs`)
    a (N,) tensor of per-sample scales; it is kept beside the network rather than passed with each call so that every
    caller keeps the canonical predict(x_t, t, cond) and a trained student samples at its own scale unchanged.
    """

    def __init__(self, net: nn.Module, schedule: Schedule, prediction: str, conditioning: Conditioning = "none",
                 null_label: int | None = None, null_cond: torch.Tensor | None = None,
                 time_ids: torch.Tensor | None = None, guidance_input: float | torch.Tensor | None = None) -> None:
        super().__init__()
        if prediction not in KINDS:
            raise InputError(f"unknown prediction kind {prediction!r}; expected one of {', '.join(KINDS)}")
        if conditioning == "class" and null_label is None:
            raise ValueError("a class-conditional ScoreModel needs null_label (the label meaning 'no class')")
        self.net, self.schedule, self.prediction = net, schedule, prediction
        self.conditioning, self.null_label = conditioning, null_label
        self.register_buffer("null_cond", null_cond, persistent=False)
        self.register_buffer("time_ids", time_ids, persistent=False)
        self.guidance_input = guidance_input

    def like(self, net: nn.Module) -> ScoreModel:
        """The same wrapper (schedule, prediction, conditioning) around another network of this family."""
        return ScoreModel(net, self.schedule, self.prediction, self.conditioning, self.null_label, self.null_cond,
                          self.time_ids, self.guidance_input)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> Prediction:
        """x_t (N, ...), t (N,) canonical -> Prediction with x0, eps of x_t's shape (float32)."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        out = self._call_net(x_t, to_device(self.schedule.native(t).float(), x_t.device), cond)
        return to_prediction(self.prediction, out, x_t, to_device(alpha, x_t.device), to_device(sigma, x_t.device))

    predict = forward

    def _call_net(self, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The network's raw output, called the way its family expects (models/backbones/)."""
        x = x.to(next(self.net.parameters()).dtype)
        return backbone_of(self.net).call(self, self.net, x, timestep, cond)

    def guidance_vector(self, n: int, device: torch.device) -> torch.Tensor:
        """guidance_input as (n,) float32 scales: a float repeated, or per-sample scales (repeated when a guided call
        stacks [uncond, cond] rows of the same samples)."""
        if self.guidance_input is None:
            raise ValueError("this network embeds a guidance scale: set the ScoreModel's guidance_input")
        w = to_device(torch.as_tensor(self.guidance_input, dtype=torch.float32).flatten(), device)
        if n % len(w):
            raise ValueError(f"{len(w)} per-sample guidance scales for a batch of {n}")
        return w.repeat(n // len(w))

    def null(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """The unconditional counterpart of a batch of conditions (for classifier-free guidance)."""
        if self.conditioning == "none" or cond is None:
            return None
        if self.conditioning == "class":
            return torch.full_like(cond, self.null_label)
        if self.null_cond is None:
            raise ValueError("this text-conditional model has no null embedding; pass null_cond when building it")
        return self.null_cond.to(cond).expand_as(cond)

    def guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
               scale: float | torch.Tensor) -> Prediction:
        """Classifier-free guided prediction; one batched call for [uncond, cond] (scale 1 = plain prediction).
        `scale`: one float, or a (N,) tensor with each sample's scale."""
        if (not torch.is_tensor(scale) and scale == 1.0) or self.conditioning == "none" or cond is None:
            return self(x_t, t, cond)
        both = self(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([self.null(cond), cond]))
        n = len(x_t)
        return cfg_combine(Prediction(both.x0[:n], both.eps[:n]), Prediction(both.x0[n:], both.eps[n:]), scale)


@contextmanager
def guidance_inputs(score: ScoreModel, w: torch.Tensor | None) -> Iterator[None]:
    """Give `score` the per-sample guidance scales w (N,) for the duration (None: leave it as it is)."""
    if w is None:
        yield
        return
    kept, score.guidance_input = score.guidance_input, w
    try:
        yield
    finally:
        score.guidance_input = kept


def is_lora(module: nn.Module) -> bool:
    """Whether the network carries peft LoRA adapters (models/lora.py adds them; here so that this module, which
    models/lora.py builds on, needs nothing from it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def embed_guidance(score: ScoreModel, scale: float, key: str = "objective.guidance_set") -> ScoreModel:
    """Give a trainable text-conditional network a guidance-scale input that starts switched off, so that it still
    predicts exactly what it did, and set its default scale to `scale` (in place; returns `score`).

    UNets get diffusers' LCM mechanism: `time_cond_proj_dim` and a zero-initialised `time_embedding.cond_proj`, fed
    the embedding of scale - 1 (StableDiffusionPipeline computes it, and turns classifier-free guidance off, whenever
    the UNet has time_cond_proj_dim). SANA transformers get SANA-Sprint's `guidance_embeds`: the time embedding
    becomes SanaCombinedTimestepGuidanceEmbeddings with the old time embedder's weights and a zero-initialised
    guidance embedder's output layer, fed scale x guidance_embeds_scale (as SanaSprintPipeline does)."""
    net, name = score.net, type(score.net).__name__
    if score.conditioning != "text":
        kind = "unconditional" if score.conditioning == "none" else "class-conditional"
        raise RecipeError(f"{key} trains a student for classifier-free guidance of a text-to-image teacher; this "
                          f"teacher is {kind}: remove {key} (use objective.guidance_scale for a fixed scale)")
    if is_lora(net):
        raise RecipeError(f"{key} adds a guidance embedding to the student, which a LoRA student's checkpoints and "
                          "exports do not carry yet: set generator.lora_rank=0 (full fine-tuning), or remove "
                          f"{key}")
    if not backbone_of(net).add_guidance_embedding(net):
        config = getattr(net, "config", None)  # diffusers' config; a plain network has none
        already = getattr(config, "time_cond_proj_dim", None) or getattr(config, "guidance_embeds", False)
        why = ("this teacher already takes a guidance scale as an input (it is guidance-distilled)" if already else
               f"{name} has no guidance-embedding option here (UNet2DConditionModel: SD 1.x/2.x, SDXL; "
               "SanaTransformer2DModel: SANA)")
        raise RecipeError(f"{key}: {why}; remove {key} (use objective.guidance_scale for a fixed teacher scale)")
    score.guidance_input = float(scale)
    return score


def student_guidance(score: ScoreModel, objective) -> ScoreModel:
    """The generator's network for an objective's recipe section: with a guidance embedding at the evaluation scale
    when it sets guidance_set (sCM and TBCM), else unchanged. Training and loading a run both build it so; bad
    guidance keys are a RecipeError naming the fix."""
    from ..errors import RecipeError

    scales, evaluated = getattr(objective, "guidance_set", None), getattr(objective, "eval_guidance", None)
    if scales is None:
        if evaluated is not None:
            raise RecipeError(f"objective.eval_guidance={evaluated} is the scale of a student trained with "
                              "objective.guidance_set, which is not set: set guidance_set (e.g. [4.0, 4.5, 5.0]) or "
                              "remove eval_guidance")
        return score
    if not scales or min(scales) < 1:
        raise RecipeError(f"objective.guidance_set={scales}: give a non-empty list of classifier-free guidance scales "
                          ">= 1 (SANA-Sprint: [4.0, 4.5, 5.0])")
    if objective.guidance_scale != 1.0:
        raise RecipeError(f"objective.guidance_scale={objective.guidance_scale} and objective.guidance_set={scales} "
                          "both set the teacher's guidance: guidance_set draws each sample's scale from the set, so "
                          "remove guidance_scale (or guidance_set, for one fixed scale and no guidance embedding)")
    try:
        return embed_guidance(score, eval_guidance(objective))
    except ValueError as e:
        raise RecipeError(str(e)) from None


def warm_start_guidance(objective) -> float:
    """The teacher's guidance for the regression warm start's ODE pairs: the scale the student is regressed at, i.e.
    its evaluation scale when it embeds one (objective.guidance_set), else the objective's guidance_scale."""
    if getattr(objective, "guidance_set", None) is not None:
        return eval_guidance(objective)
    return getattr(objective, "guidance_scale", 1.0)


def eval_guidance(objective) -> float:
    """The one scale a student trained on objective.guidance_set samples and exports at: objective.eval_guidance,
    by default the middle of the sorted set (4.5 of SANA-Sprint's {4, 4.5, 5})."""
    if objective.eval_guidance is not None:
        return float(objective.eval_guidance)
    scales = sorted(objective.guidance_set)
    return float(scales[len(scales) // 2])


@contextmanager
def drawn_guidance(score: ScoreModel, scales: list[float] | None, n: int) -> Iterator[torch.Tensor | None]:
    """Draw n per-sample guidance scales uniformly from `scales` (SANA-Sprint's np.random.choice with replacement),
    from the run's global random stream (parallel.rand: checkpoints resume it), and give them to the student `score`
    for the block; yields them (None, drawing nothing, when scales is None)."""
    from .. import parallel

    if scales is None:
        yield None
        return
    idx = (parallel.rand(n) * len(scales)).long().clamp_max(len(scales) - 1)
    w = torch.tensor(scales, dtype=torch.float32)[idx]
    with guidance_inputs(score, w):
        yield w
