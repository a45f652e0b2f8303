"""Build ScoreModels from diffusers folders or hub ids (fetched into the Hugging Face cache; offline when
HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..diffusion.schedules import RectifiedFlow, Schedule, VPDiscrete
from ..errors import InputError, MissingFileError
from .backbones import backbone_of
from .score import ScoreModel

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}
REPO_ROOT = Path(__file__).resolve().parents[2]


def bundled_path(path: str) -> Path:
    """A file or folder as given, else relative to the stepdistill checkout (the bundled `checkpoints/...`)."""
    p = Path(path)
    return p if p.exists() or p.is_absolute() else REPO_ROOT / p


def resolve_path(path: str) -> Path:
    """A local folder (as given, or relative to the stepdistill checkout for bundled `checkpoints/...`), or a hub id
    (org/name) fetched by diffusers into the Hugging Face cache: only the pipeline's own components, in safetensors,
    and from the cache alone when HF_HUB_OFFLINE=1. Either way the rest of the code reads one local folder, so every
    supported family loads the same by folder or by hub id."""
    if bundled_path(path).is_dir():
        return bundled_path(path)
    if path.count("/") == 1 and not path.startswith((".", "/")) and not path.startswith("checkpoints/"):
        return _hub_snapshot(path)
    raise MissingFileError(f"teacher folder {path!r} not found; looked in {Path(path).resolve()} and "
                           f"{(REPO_ROOT / path).resolve()}. Give a diffusers folder (with model_index.json, or unet/ "
                           "and scheduler/) or a hub id such as org/name.")


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a diffusers pipeline on the hub, downloaded by diffusers unless offline."""
    from diffusers import DiffusionPipeline

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        folder = Path(DiffusionPipeline.download(repo_id, local_files_only=offline))
    except Exception as e:  # hub errors come in many classes (offline, 404, gated, network): say what to do
        how = ("it is not in the Hugging Face cache and HF_HUB_OFFLINE=1: download it where the hub is reachable "
               f"(`hf download {repo_id}`) or give a local folder") if offline else (
               "check the id, your network and, for gated models, `hf auth login`; or give a local folder")
        raise MissingFileError(f"could not fetch the diffusers pipeline {repo_id!r}: {how} ({type(e).__name__}: "
                               f"{e})") from None
    if not (folder / "model_index.json").exists():
        raise MissingFileError(f"{repo_id} has no model_index.json: a full diffusers pipeline is needed")
    return folder


def from_pretrained_locally(cls, where: Path, subfolder: str, **kw):
    """`cls.from_pretrained` on `subfolder` of the local folder `where`, offline; a missing or unreadable part is a
    FileNotFoundError naming it."""
    try:  # `where` is always a local folder (resolve_path fetched hub ids): never go online here
        return cls.from_pretrained(str(where), subfolder=subfolder, local_files_only=True, **kw)
    except OSError as e:
        raise MissingFileError(f"could not load {subfolder}/ of {where}: {e}") from None


def schedule_from_scheduler(scheduler) -> tuple[Schedule, str]:
    """(Schedule, prediction kind) from a diffusers scheduler instance."""
    name = type(scheduler).__name__
    if name.startswith("FlowMatch") or scheduler.config.get("use_flow_sigmas"):  # SANA: DPM-Solver on flow sigmas
        return RectifiedFlow(native_scale=float(scheduler.config.num_train_timesteps)), "flow"
    if hasattr(scheduler, "alphas_cumprod"):
        kind = scheduler.config.get("prediction_type", "epsilon")
        if kind not in PREDICTION_TYPES:
            raise InputError(f"{name} has prediction_type={kind!r}; supported: {', '.join(PREDICTION_TYPES)}")
        return VPDiscrete.from_diffusers(scheduler), PREDICTION_TYPES[kind]
    raise InputError(f"scheduler {name} is not supported yet: need a DDPM-family scheduler (alphas_cumprod) or "
                     "FlowMatchEulerDiscreteScheduler")


def read_json(path: Path) -> dict:
    """A JSON object from a file; an InputError naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a UTF-8 text file") from None
    except ValueError as e:
        raise InputError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object, got a {type(data).__name__}")
    return data


def diffusers_class(config: Path):
    """The diffusers class a saved config.json names in `_class_name`; an InputError naming the file otherwise."""
    import diffusers

    name = read_json(config).get("_class_name")
    if not isinstance(name, str) or not name.isidentifier() or not hasattr(diffusers, name):
        raise InputError(f"{config}: _class_name {name!r} is not a diffusers class")
    return getattr(diffusers, name)


def load_diffusers_score(path: str, subfolder: str = "unet", dtype: torch.dtype = torch.float32) -> ScoreModel:
    """ScoreModel from a diffusers folder (or hub id, see `resolve_path`) with `<subfolder>/` and `scheduler/`.

    Conditioning is read from `stepdistill.json` when present (bundled teachers); otherwise UNet2DModel with
    `num_class_embeds` is class-conditional with the last label as null, UNet2DConditionModel is text-conditional.
    """
    where = resolve_path(path)
    meta = read_json(where / "stepdistill.json") if (where / "stepdistill.json").exists() else {}
    for part in (subfolder, "scheduler"):
        if not (where / part).is_dir():
            raise MissingFileError(f"{where} has no {part}/ folder: give a diffusers folder saved with "
                                   "save_pretrained (a pipeline folder, or unet/ and scheduler/)")
    model_cls = diffusers_class(where / subfolder / "config.json")
    sched_cls = diffusers_class(where / "scheduler" / "scheduler_config.json")
    net = from_pretrained_locally(model_cls, where, subfolder, torch_dtype=dtype)
    scheduler = from_pretrained_locally(sched_cls, where, "scheduler")
    return score_from_diffusers(net, scheduler, meta)


def score_from_diffusers(net, scheduler, meta: dict | None = None) -> ScoreModel:
    """ScoreModel of a loaded diffusers network and its scheduler (`meta`: the folder's stepdistill.json, if any)."""
    meta = meta or {}
    schedule, kind = schedule_from_scheduler(scheduler)
    conditioning = backbone_of(net).conditioning(net)
    if conditioning is None:
        raise InputError(f"{type(net).__name__} is not supported yet (UNet2DModel, UNet2DConditionModel, "
                         "SD3Transformer2DModel, SanaTransformer2DModel, FluxTransformer2DModel)")
    null_label = meta.get("null_label", net.config.num_class_embeds - 1) if conditioning == "class" else None
    return ScoreModel(net, schedule, kind, conditioning, null_label=null_label)
