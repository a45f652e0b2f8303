"""Build ScoreModels from diffusers folders or hub ids (local_files_only when HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..diffusion.schedules import RectifiedFlow, Schedule, VPDiscrete
from .score import ScoreModel

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str) -> Path | str:
    """A local folder (as given, or relative to the stepdistill checkout for bundled `checkpoints/...`), else the
    string itself, treated as a hub id."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_dir():
            return candidate
    if path.count("/") == 1 and not path.startswith((".", "/")) and not path.startswith("checkpoints/"):
        return path  # looks like a hub id: org/name
    raise FileNotFoundError(f"teacher folder {path!r} not found; looked in {Path(path).resolve()} and "
                            f"{(REPO_ROOT / path).resolve()}. Give a diffusers folder (with unet/ and scheduler/) "
                            "or a hub id such as org/name.")


def schedule_from_scheduler(scheduler) -> tuple[Schedule, str]:
    """(Schedule, prediction kind) from a diffusers scheduler instance."""
    name = type(scheduler).__name__
    if name.startswith("FlowMatch") or scheduler.config.get("use_flow_sigmas"):  # SANA: DPM-Solver on flow sigmas
        return RectifiedFlow(native_scale=float(scheduler.config.num_train_timesteps)), "flow"
    if hasattr(scheduler, "alphas_cumprod"):
        kind = scheduler.config.get("prediction_type", "epsilon")
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"{name} has prediction_type={kind!r}; supported: {', '.join(PREDICTION_TYPES)}")
        return VPDiscrete.from_diffusers(scheduler), PREDICTION_TYPES[kind]
    raise ValueError(f"scheduler {name} is not supported yet: need a DDPM-family scheduler (alphas_cumprod) or "
                     "FlowMatchEulerDiscreteScheduler")


def _from_pretrained(cls, where: Path | str, subfolder: str, **kw):
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or isinstance(where, Path)
    try:
        return cls.from_pretrained(str(where), subfolder=subfolder, local_files_only=offline, **kw)
    except OSError as e:
        raise FileNotFoundError(f"could not load {subfolder}/ of {where}: {e}") from None


def load_diffusers_score(path: str, subfolder: str = "unet", dtype: torch.dtype = torch.float32) -> ScoreModel:
    """ScoreModel from a diffusers folder or hub id with `<subfolder>/` and `scheduler/`.

    Conditioning is read from `stepdistill.json` when present (bundled teachers); otherwise UNet2DModel with
    `num_class_embeds` is class-conditional with the last label as null, UNet2DConditionModel is text-conditional.
    """
    import diffusers

    where = resolve_path(path)
    meta = {}
    if isinstance(where, Path) and (where / "stepdistill.json").exists():
        meta = json.loads((where / "stepdistill.json").read_text())
    if isinstance(where, Path):
        cfg = json.loads((where / subfolder / "config.json").read_text())
        model_cls = getattr(diffusers, cfg["_class_name"])
        sched_cfg = json.loads((where / "scheduler" / "scheduler_config.json").read_text())
        sched_cls = getattr(diffusers, sched_cfg["_class_name"])
    else:
        model_cls, sched_cls = diffusers.UNet2DConditionModel, diffusers.DDPMScheduler
    net = _from_pretrained(model_cls, where, subfolder, torch_dtype=dtype)
    scheduler = _from_pretrained(sched_cls, where, "scheduler")
    schedule, kind = schedule_from_scheduler(scheduler)
    if isinstance(net, diffusers.UNet2DModel):
        n_cls = net.config.num_class_embeds
        conditioning = "class" if n_cls else "none"
        null_label = meta.get("null_label", n_cls - 1 if n_cls else None)
        return ScoreModel(net, schedule, kind, conditioning, null_label=null_label)
    if isinstance(net, (diffusers.UNet2DConditionModel, diffusers.SD3Transformer2DModel,
                        diffusers.SanaTransformer2DModel, diffusers.FluxTransformer2DModel)):
        return ScoreModel(net, schedule, kind, "text")
    raise ValueError(f"{type(net).__name__} is not supported yet (UNet2DModel, UNet2DConditionModel, "
                     "SD3Transformer2DModel, SanaTransformer2DModel, FluxTransformer2DModel)")
