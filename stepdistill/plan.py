"""`stepdistill plan`: per-GPU peak memory and FLOPs of one training iteration of a recipe, before any run.

The recipe's networks are built the way training builds them (train/trainer.build, the EMA copy, LoRA adapters that
share the teacher's weights) with their parameters on the meta device: real sizes, no weights, no GPU. Then:

- static state, counted from the built parameters (each tensor once, so LoRA's shared base counts once): the frozen
  teacher (fp32, or bf16 with train.teacher_dtype=bf16) and the rest of its pipeline that training moves to the
  device with it (a VAE and text encoders, in their own dtype), trained weights (fp32 master weights;
  train.precision=bf16 is autocast), their gradients (fp32) and AdamW's two fp32 moments, the EMA copy of the
  generator's trained weights.
  With train.fsdp and N GPUs the teacher, generator, fake score, EMA and their gradients and moments are split N
  ways; discriminator heads are held whole (as the trainer does);
- the transient peak of each phase (forward, backward, and the AdamW step), measured by running the objective's
  phases of iteration 0 on meta tensors at the per-GPU micro-batch (train.batch_size / GPUs / train.grad_accum), with
  gradient checkpointing as configured, under a dispatch mode that tracks the bytes of every tensor the phase
  allocates while it is alive (LiveBytes). bf16 autocast does not act on meta tensors, so train.precision=bf16 is
  emulated (BF16Emulation: matmuls and convolutions in bf16, normalisations and losses in fp32, autocast's policy for
  the ops that hold the memory);
- FLOPs of the iteration (torch.utils.flop_counter on the same meta pass, times grad_accum: per GPU).

Estimated rather than measured: FSDP's all-gather buffers (two of the largest block's unsharded weights, forward
prefetch) and the AdamW step's temporaries (one fp32 copy of the phase's trained weights, foreach). The peak is what
torch.cuda.max_memory_allocated reports; the CUDA context and the caching allocator's fragmentation come on top
(`HEADROOM` of the card is kept free when judging whether a run fits).
"""
from __future__ import annotations

import copy
import re
import weakref
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .recipe import Recipe, RecipeError, apply_overrides, load_recipe, to_dict

GiB = 2 ** 30
HEADROOM = 0.05  # share of the card kept free for the CUDA context and the allocator's fragmentation
UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": GiB,
         "tib": 2 ** 40}


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '141 GB', '8e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise RecipeError(f"--gpu-memory {text!r}: give a size like 80GiB, 80GB or 24GiB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors allocated under the mode that are still alive, and their peak. Each new storage is
    counted once, when an op returns it (views and in-place results share an input's storage and count nothing), and
    uncounted when it is freed. Works on real and meta tensors alike."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak = 0, 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            key = id(s)
            if key in inputs or key in self._seen:
                continue
            self._seen.add(key)
            self.live += s.nbytes()
            weakref.finalize(s, self._free, key, s.nbytes())
        self.peak = max(self.peak, self.live)
        return out


LOW = {torch.nn.functional.linear, torch.nn.functional.conv2d, torch.nn.functional.conv1d, torch.matmul,
       torch.bmm, torch.baddbmm, torch.mm, torch.addmm, torch.nn.functional.scaled_dot_product_attention,
       torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm, torch.einsum}
FP32 = {torch.nn.functional.group_norm, torch.nn.functional.layer_norm, torch.nn.functional.softmax,
        torch.Tensor.softmax, torch.nn.functional.mse_loss, torch.nn.functional.softplus}


class BF16Emulation(TorchFunctionMode):
    """torch.autocast(bf16)'s policy for the ops that hold the memory, on tensors autocast ignores (meta): matmuls,
    convolutions and attention run in bf16, normalisations, softmax and losses in fp32; the rest keep their inputs'
    dtype. Casts happen above autograd, so the saved activations have the dtypes autocast gives them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to = torch.bfloat16 if func in LOW else torch.float32 if func in FP32 else None
        if to is not None:
            def cast(x):
                return x.to(to) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != to else x
            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class FusedAttention(TorchFunctionMode):
    """scaled_dot_product_attention on meta tensors through a fused kernel's meta function (flash attention's CPU
    variant: the same outputs and saved tensors, output and logsumexp, as the CUDA flash / memory-efficient kernels
    sdpa picks on a GPU, with or without a mask). On meta tensors sdpa would otherwise take its math path and hold
    every attention matrix. Where a caller forces the math backend (sCM's JVP: kernels/forward_ad.py) it stays."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            a = {**dict(zip(SDPA_ARGS, args)), **kwargs}  # diffusers' attention dispatcher passes them by name
            q, k, v, mask = a.get("query"), a.get("key"), a.get("value"), a.get("attn_mask")
            fused = torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
            if q is not None and q.is_meta and fused and not a.get("enable_gqa") and q.shape[1] == k.shape[1]:
                if mask is not None and mask.dtype != torch.bool:
                    mask = mask.to(q.dtype)
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k.to(q.dtype), v.to(q.dtype), a.get("dropout_p", 0.0), a.get("is_causal", False),
                    attn_mask=mask, scale=a.get("scale"))[0]
        return func(*args, **kwargs)


def _caller() -> str:
    """file:line of the innermost frame of this package outside this module and devices.py (who asked)."""
    import traceback
    from pathlib import Path

    package = Path(__file__).parent
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path.is_relative_to(package) and path.name not in ("plan.py", "devices.py"):
            return f"stepdistill/{path.relative_to(package)}:{frame.lineno}"
    return "outside stepdistill"


class HostSync(TorchDispatchMode):
    """Where a pass on meta tensors would make a GPU's host wait (`waits`, file:line each): a value read back
    (Tensor.item() or float() of a device tensor, seen through meta_scalars) or a copy up from pageable host memory
    (a CPU tensor copied to the device without non_blocking: torch synchronises the stream after it;
    devices.to_device marks its pinned copies non-blocking). Scalars (0-d CPU tensors) go up as kernel arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten._to_copy.default:
            src, to, blocking = args[0], kwargs.get("device"), not kwargs.get("non_blocking", False)
        elif func is aten.copy_.default:
            src, to, blocking = args[1], args[0].device, not (args[2] if len(args) > 2 else kwargs.get("non_blocking"))
        else:
            src = None
        if src is not None and blocking and src.device.type == "cpu" and src.ndim > 0 and to is not None \
                and torch.device(to).type == "meta":
            self.waits.append(f"a blocking copy from host memory at {_caller()}")
        return func(*args, **kwargs)


@contextmanager
def meta_scalars(reads: list[str] | None = None):
    """Meta tensors have no values: Tensor.item() and float() of one give 0.0 (objectives log scalars); each such read
    is appended to `reads` (file:line)."""
    item, to_float = torch.Tensor.item, torch.Tensor.__float__

    def read(self, real):
        if not self.is_meta:
            return real(self)
        if reads is not None:
            reads.append(f"a value read back at {_caller()}")
        return 0.0

    torch.Tensor.item = lambda self: read(self, item)
    torch.Tensor.__float__ = lambda self: read(self, to_float)
    try:
        yield
    finally:
        torch.Tensor.item, torch.Tensor.__float__ = item, to_float


@contextmanager
def meta_autocast():
    """torch.autocast and torch.is_autocast_enabled know no meta device type (sCM opens an fp32 region for its
    tangents on the tensors' device and asks whether autocast is on): for meta they act as for the CPU, where autocast
    is off and does nothing to meta tensors (BF16Emulation stands for it there)."""
    autocast, enabled = torch.autocast, torch.is_autocast_enabled
    cpu = lambda device: "cpu" if device == "meta" else device  # noqa: E731

    class MetaAutocast(autocast):
        def __init__(self, device_type: str, *args, **kwargs) -> None:
            super().__init__(cpu(device_type), *args, **kwargs)

    torch.autocast, torch.is_autocast_enabled = MetaAutocast, lambda *device: enabled(*map(cpu, device))
    try:
        yield
    finally:
        torch.autocast, torch.is_autocast_enabled = autocast, enabled


@dataclass
class Plan:
    recipe: Recipe
    gpus: int
    gpu_memory: int
    micro_batch: int
    components: dict[str, int] = field(default_factory=dict)  # bytes per GPU held through the run, by component
    transient: dict[str, int] = field(default_factory=dict)  # per phase: bytes on top of the static state
    params: dict[str, int] = field(default_factory=dict)  # parameters per role (each tensor counted once)
    trainable: int = 0
    flops: float | None = None  # per GPU per iteration (iteration 0: every phase of the objective)
    largest_phase: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def static(self) -> int:
        return sum(self.components.values())

    @property
    def peak(self) -> int:
        return self.static + max(self.transient.values(), default=0)

    @property
    def fits(self) -> bool:
        return self.peak <= (1 - HEADROOM) * self.gpu_memory

    def as_dict(self) -> dict:
        return {"gpus": self.gpus, "gpu_memory": self.gpu_memory, "micro_batch": self.micro_batch,
                "params": self.params, "trainable_params": self.trainable, "components": self.components,
                "transient": self.transient, "largest_phase": self.largest_phase, "peak": self.peak,
                "fits": self.fits, "flops": self.flops, "notes": self.notes}


def _unique(modules) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    for m in modules:
        if m is not None:
            for p in [*m.parameters(), *m.buffers()]:
                out.setdefault(id(p), p)
    return out


def _bytes(tensors, dtype_bytes: int | None = None) -> int:
    return sum(t.numel() * (dtype_bytes or t.element_size()) for t in tensors)


def build_meta(recipe: Recipe):
    """The run's networks as trainer.Trainer builds them (trainer.build, then the EMA copy), weights on meta, and the
    teacher ODE pairs an objective keeps (vsd's regression term; the warm start makes them on the device)."""
    from accelerate import init_empty_weights

    from .training.ema import EMA
    from .training.trainer import build

    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        built = build(recipe)
        if built.objective.keeps_pairs:
            n = recipe.generator.warm_start_pairs
            cond = built.sample_cond(n)
            z = torch.empty(n, *built.teacher.shape, device="meta")
            built.objective.pairs = (z, None if cond is None else cond.to("meta"), torch.empty_like(z))
    ema = EMA(built.nets.generator, recipe.train.ema) if recipe.train.ema > 0 else None
    return built, ema


def plan(recipe: Recipe, gpus: int = 1, gpu_memory: int = 80 * GiB, activations: bool = True,
         flops: bool = True) -> Plan:
    """Per-GPU memory and FLOPs of one iteration of `recipe` on `gpus` GPUs of `gpu_memory` bytes (module doc);
    `flops=False` skips counting them (a quarter of the time; suggestions re-plan memory only)."""
    from .models.score import held_modules
    from .training.trainer import check_fsdp

    t = recipe.train
    if gpus < 1 or t.batch_size % (gpus * t.grad_accum):
        raise RecipeError(f"train.batch_size={t.batch_size} must split into --gpus {gpus} x train.grad_accum="
                          f"{t.grad_accum} micro-batches of equal rows")
    sharded = t.fsdp and gpus > 1
    if sharded:
        check_fsdp(recipe)
    built, ema = build_meta(recipe)
    nets, obj = built.nets, built.objective
    p = Plan(recipe, gpus, gpu_memory, t.batch_size // (gpus * t.grad_accum))
    split = gpus if sharded else 1

    # each tensor belongs to the first role that holds it: a LoRA network's base is the teacher's
    roles = {"teacher": nets.teacher, "generator": nets.generator, "fake_score": nets.fake_score,
             "discriminator": nets.discriminator, "ema": ema.model if ema is not None else None}
    owner: dict[int, str] = {}
    tensors: dict[str, list[torch.Tensor]] = {r: [] for r in roles}
    for role, m in roles.items():
        for k, x in _unique([m]).items():
            if k not in owner:
                owner[k] = role
                tensors[role].append(x)
    # the rest of the teacher, which training moves to the device with it (Teacher.to): a pipeline's VAE and text
    # encoders, in their own dtype (train.teacher_dtype casts the score network only), whole on every GPU
    rest = [x for k, x in _unique(held_modules(built.teacher)).items() if k not in owner]
    for name in obj.trains:  # parameters an objective trains with a network (sCM's adaptive weight)
        tensors[name].extend(x for x in obj.parameters(name) if id(x) not in owner)
    teacher_bytes = 2 if t.teacher_dtype == "bf16" else None
    trained = {r: [x for x in tensors[r] if isinstance(x, torch.nn.Parameter) and x.requires_grad]
               for r in obj.trains}
    p.params = {r: sum(x.numel() for x in tensors[r] if isinstance(x, torch.nn.Parameter)) for r in roles
                if roles[r] is not None}
    p.trainable = sum(x.numel() for r in trained for x in trained[r])
    shard = lambda role, b: b // split if role != "discriminator" else b  # noqa: E731 (heads are held whole)
    p.components["teacher weights" + (" (bf16)" if teacher_bytes else "")] = shard("teacher", _bytes(
        tensors["teacher"], teacher_bytes))
    if rest:
        p.components["teacher VAE and text encoders"] = _bytes(rest)
    for r in obj.trains:
        frozen = [x for x in tensors[r] if not (isinstance(x, torch.nn.Parameter) and x.requires_grad)]
        p.components[f"{r} weights"] = shard(r, _bytes(trained[r], 4) + _bytes(frozen))
        p.components[f"{r} AdamW moments"] = shard(r, _bytes(trained[r], 8))
    if ema is not None:
        p.components["EMA weights"] = shard("ema", _bytes(tensors["ema"], 4))
    if obj.keeps_pairs:
        p.components["teacher ODE pairs (regression)"] = _bytes(x for x in obj.pairs if x is not None)
    grads = {r: shard(r, _bytes(trained[r], 4)) for r in obj.trains}
    if sharded:  # two blocks' full weights gathered at a time (the one running, the one prefetched): estimated
        blocks = [b for r in ("teacher", "generator", "fake_score") if roles[r] is not None
                  for b in roles[r].modules() if isinstance(b, torch.nn.ModuleList)]
        largest = max((_bytes(_unique([c]).values()) for b in blocks for c in b), default=0)
        p.components["FSDP all-gather buffers (estimate)"] = 2 * largest
    if activations:
        _measure_phases(recipe, built, ema, p, grads, flops)
    else:
        p.transient = {f"{r} (gradients only)": g for r, g in grads.items()}
        p.notes.append("activations not measured (--no-activations)")
    return p


_MEASURED: dict[str, tuple[dict, float | None]] = {}  # re-plans (suggestions) reuse a pass with the same key


def _measure_phases(recipe: Recipe, built, ema, p: Plan, grads: dict[str, int], count_flops: bool) -> None:
    """Each phase's transient bytes per GPU from the meta pass (`_run_phases`, cached): the measured peak with the
    phase's whole gradients replaced by this GPU's share, or the AdamW step if larger (estimate: the gradients and
    one fp32 temporary of the weights, foreach)."""
    import json

    data = to_dict(recipe)
    for k in ("fsdp", "batch_size", "grad_accum", "iterations", "compile"):  # what does not change one GPU's pass
        data["train"].pop(k, None)
    key = json.dumps([data, p.micro_batch, count_flops], sort_keys=True, default=str)
    if key not in _MEASURED:
        _MEASURED[key] = _run_phases(recipe, built, ema, p.micro_batch, count_flops=count_flops)
    phases, flops = _MEASURED[key]
    for name, (peak, full_grads, networks, note, waits) in phases.items():
        p.notes += [note] if note else []
        p.notes += [f"phase {name} makes the host wait for the GPU: {w}" for w in waits]
        share = sum(grads[n] for n in networks)
        measured = peak - full_grads + share if peak >= full_grads else peak
        p.transient[name] = max(measured, 2 * share)
    p.flops = None if flops is None else flops * recipe.train.grad_accum
    p.largest_phase = max(p.transient, key=p.transient.get, default="")


class _GlobalOnly:
    """Stands for FlopCounterMode's ModuleTracker: every FLOP counted under "Global", no module hooks."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def total_flops():
    """torch.utils.flop_counter.FlopCounterMode for its total only (its per-module attribution hooks fail on a module
    called with a parameter under no_grad: SANA's norm_out inside sCM's JVP), counting FusedAttention's CPU flash
    kernel as the CUDA one it stands for (FlopCounterMode has no formula for it)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    flops = FlopCounterMode(display=False, custom_mapping={  # arguments arrive as shapes
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *_, **__: sdpa_backward_flop_count(g, q, k, v)})
    flops.mod_tracker = _GlobalOnly()
    return flops


def _run_phases(recipe: Recipe, built, ema, m: int, iterations: int = 1, count_flops: bool = True
                ) -> tuple[dict, float | None]:
    """Run the phases of the first `iterations` iterations (each kind once) on meta tensors at micro-batch m: per
    phase (peak bytes allocated: activations, gradients, temporaries; the phase's whole gradient bytes; its networks;
    a note if it could not run; where it would make a GPU's host wait, HostSync), and the FLOPs of all of them."""
    from .kernels import configure_networks
    from .objectives.base import Batch

    t = recipe.train
    cfg = copy.copy(t)
    cfg.compile = False  # nothing to compile on meta
    out_phases = {}
    with torch.random.fork_rng(devices=[]):
        # the run's seed: a few-step generator's step index (how many steps its backward simulation runs) is a random
        # draw, and an unseeded one made the FLOPs of 4-step recipes differ from one plan to the next
        torch.manual_seed(t.seed)
        built.to(torch.device("meta"))
        configure_networks(built.nets, cfg, also=(ema.model,) if ema is not None else ())
        obj = built.objective
        cond = built.sample_cond(m)
        x0 = torch.empty(m, *built.teacher.shape) if obj.uses_data else None
        batch = Batch(m, None if cond is None else cond.to("meta"), None if x0 is None else x0.to("meta"))
        samples = None
        flops = total_flops() if count_flops else nullcontext()
        host = HostSync()  # its list also takes the values read back (meta_scalars)
        with meta_scalars(host.waits), meta_autocast(), flops:
            for phase in (p for step in range(iterations) for p in obj.phases(step)):
                name, note = "+".join(phase.networks), ""
                if name in out_phases:
                    continue
                params = [x for n in phase.networks for x in built.nets.get(n).parameters() if x.requires_grad]
                tracker = LiveBytes()
                host.waits.clear()
                try:
                    functions = [*([FusedAttention()] if t.attention != "math" else []),
                                 *([BF16Emulation()] if t.precision == "bf16" else [])]
                    with entered([tracker, host, *functions]), recompute_under(functions):
                        out = phase.loss(batch, samples)
                        out.loss.backward()
                        samples = out.samples if out.samples is not None else samples
                        del out
                except Exception as e:  # a pass meta tensors cannot run: say so rather than guess
                    note = (f"phase {name} could not run on meta tensors ({type(e).__name__}: {e}); its activations "
                            "are not counted")
                    tracker.peak = 0
                for x in [*built.nets.teacher.parameters(), *params]:
                    x.grad = None
                out_phases[name] = (tracker.peak, _bytes(params, 4), phase.networks, note, sorted(set(host.waits)))
    return out_phases, float(flops.get_total_flops()) if count_flops else None


def dry_run(recipe: Recipe, iterations: int = 4) -> list[str]:
    """A training iteration of `recipe` at its real size on meta tensors (no weights, no GPU): the phases of the
    first `iterations` iterations, each kind once (forward and backward, as `plan` runs them: an objective whose
    first iterations train one network, like DisBack's first stage, gets to its others), then AdamW's step on every
    trained network and the EMA's update. Shape, dtype and device errors of a real-size run surface here in seconds,
    and so do the places a phase would make a GPU's host wait (HostSync). Returns what could not run or would wait;
    empty when everything ran without waiting."""
    built, ema = build_meta(recipe)
    phases, _ = _run_phases(recipe, built, ema, max(recipe.train.batch_size // recipe.train.grad_accum, 1),
                            iterations)
    notes = [note for *_, note, _ in phases.values() if note]
    notes += [f"phase {name} makes the host wait for the GPU: {w}" for name, (*_, waits) in phases.items()
              for w in waits]
    ran = {n for *_, networks, note, _ in phases.values() if not note for n in networks}
    notes += [f"no phase of the first {iterations} iterations trains {n}" for n in built.objective.trains
              if n not in ran]
    try:
        for name in built.objective.trains:
            params = [x for x in built.nets.get(name).parameters() if x.requires_grad]
            for x in params:
                x.grad = torch.zeros_like(x)
            torch.optim.AdamW(params, foreach=True).step()
        if ema is not None:  # its buffers were built on the CPU (build_meta): on meta with the generator's
            ema.model.to("meta")
            ema.update(built.nets.generator, where=torch.ones((), dtype=torch.bool, device="meta"))  # a GPU's
    except Exception as e:  # noqa: BLE001 (reported, as a phase's error is)
        notes.append(f"the optimizer step or EMA update could not run on meta tensors ({type(e).__name__}: {e})")
    return notes


@contextmanager
def entered(contexts):
    with ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


@contextmanager
def recompute_under(modes):
    """torch.utils.checkpoint recomputes a block in backward outside the torch-function modes active around the pass
    (gradient checkpointing, kernels/execution.py; dispatch modes such as LiveBytes do stay): recompute it under
    `modes` too, so that it runs the kernels and dtypes of its forward (checkpoint checks the dtypes)."""
    from torch.utils import checkpoint as ckpt

    real = ckpt.checkpoint

    def checkpoint(fn, *args, context_fn=ckpt.noop_context_fn, **kwargs):
        def contexts():
            forward, recompute = context_fn()
            return forward, entered([recompute, *modes])
        return real(fn, *args, context_fn=contexts, **kwargs)

    ckpt.checkpoint = checkpoint
    try:
        yield
    finally:
        ckpt.checkpoint = real


# ---- suggestions ---------------------------------------------------------------------------------------------------
def candidates(recipe: Recipe, gpus: int) -> list[tuple[str, list[str], int]]:
    """Changes that save memory, cheapest first: (description, overrides, gpus)."""
    t, g = recipe.train, recipe.generator
    out = []
    if t.teacher_dtype != "bf16":
        extra = ["train.precision=bf16"] if g.lora_rank and t.precision != "bf16" else []
        out.append(("frozen teacher in bf16", ["train.teacher_dtype=bf16", *extra], gpus))
    if t.precision != "bf16":
        out.append(("bf16 autocast", ["train.precision=bf16"], gpus))
    if not t.gradient_checkpointing:
        out.append(("gradient checkpointing (about one more forward per backward)",
                    ["train.gradient_checkpointing=true"], gpus))
    if gpus > 1 and not t.fsdp and not g.lora_rank:
        out.append((f"FSDP over the {gpus} GPUs", ["train.fsdp=true"], gpus))
    micro = t.batch_size // (gpus * t.grad_accum)
    if micro > 1:
        k = t.grad_accum * 2 if micro % 2 == 0 else t.grad_accum * micro
        out.append((f"micro-batches of {t.batch_size // (gpus * k)} (train.grad_accum={k}; slower)",
                    [f"train.grad_accum={k}"], gpus))
    if not g.lora_rank:
        out.append(("LoRA rank 64 instead of full fine-tuning (a different student)",
                    ["generator.lora_rank=64", "train.fsdp=false"], gpus))
    if t.fsdp or not g.lora_rank:
        n = gpus * 2
        if t.batch_size % (n * t.grad_accum) == 0:
            out.append((f"{n} GPUs with FSDP", ["train.fsdp=true"], n))
    return out


def suggest(recipe: Recipe, gpus: int, gpu_memory: int, limit: int = 4) -> list[dict]:
    """The candidates that make the run fit alone, then (if none does) the cheapest accumulation of them that fits;
    each re-planned."""
    from tqdm import tqdm

    data = to_dict(recipe)

    def replan(over: list[str], n: int) -> Plan | None:
        """The plan with `over`, None if it cannot fit or the recipe refuses the change (RecipeError, a LoRA rank
        above a layer's width). Weights, moments and one network's gradients alone bound the peak from below: a
        change they already rule out skips the meta pass, most of a re-plan's time at SDXL size."""
        try:
            changed = load_recipe(data=apply_overrides(copy.deepcopy(data), over))
            if not plan(changed, n, gpu_memory, activations=False).fits:
                return None
            q = plan(changed, n, gpu_memory, flops=False)
        except ValueError:
            return None
        return q if q.fits else None

    found, acc_over, acc_gpus = [], [], gpus
    bar = dict(leave=False, disable=None, unit="plan")  # each re-plan takes seconds at SDXL size; shown on a terminal
    for desc, over, n in tqdm(candidates(recipe, gpus), desc="re-planning each change", **bar):
        if q := replan(over, n):
            found.append({"change": desc, "overrides": over, "gpus": n, "peak": q.peak})
    if found:
        return sorted(found, key=lambda s: s["peak"])[:limit] if len(found) > limit else found
    for desc, over, n in tqdm(candidates(recipe, gpus), desc="re-planning the changes together", **bar):
        if "LoRA" in desc and acc_gpus > 1 and "train.fsdp=true" in acc_over:
            continue
        acc_over, acc_gpus = acc_over + over, max(acc_gpus, n)
        if q := replan(acc_over, acc_gpus):
            return [{"change": "together: " + ", ".join(acc_over), "overrides": acc_over, "gpus": acc_gpus,
                     "peak": q.peak}]
    return []


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= 0.1 * GiB else f"{n / 2 ** 20:.2f} MiB"


def report(p: Plan, suggestions: list[dict] | None = None) -> str:
    lines = [f"per GPU, {p.gpus} GPU(s) of {fmt_bytes(p.gpu_memory)}, micro-batch {p.micro_batch}:"]
    lines.append("  parameters: " + ", ".join(f"{r} {n / 1e9:.3f}B" for r, n in p.params.items())
                 + f"; trained {p.trainable / 1e9:.3f}B")
    for k, v in p.components.items():
        lines.append(f"  {k:<44} {fmt_bytes(v):>12}")
    for k, v in p.transient.items():
        mark = " <- largest" if k == p.largest_phase else ""
        lines.append(f"  {'phase ' + k + ' (activations, grads, temps)':<44} {fmt_bytes(v):>12}{mark}")
    lines.append(f"  {'peak':<44} {fmt_bytes(p.peak):>12}")
    if p.flops is not None:
        lines.append(f"  FLOPs per iteration per GPU: {p.flops / 1e12:.1f} TFLOP" if p.flops >= 1e11 else
                     f"  FLOPs per iteration per GPU: {p.flops / 1e9:.3f} GFLOP")
    lines += [f"  note: {n}" for n in p.notes]
    verdict = "fits" if p.fits else "does not fit"
    lines.append(f"{verdict} ({fmt_bytes(p.peak)} of {fmt_bytes((1 - HEADROOM) * p.gpu_memory)} usable)")
    if suggestions is not None and not p.fits:
        if not suggestions:
            lines.append("no single change or combination tried makes it fit")
        for s in suggestions:
            gpus = f" --gpus {s['gpus']}" if s["gpus"] != p.gpus else ""
            lines.append(f"  - {s['change']}: {' '.join(s['overrides'])}{gpus} -> {fmt_bytes(s['peak'])}")
    return "\n".join(lines)


def run_plan(path: str, overrides: list[str], gpus: int, gpu_memory: str, as_json: bool = False,
             suggestions: bool = True) -> str:
    """What `stepdistill plan` prints."""
    import json

    recipe = load_recipe(path, overrides)
    memory = parse_bytes(gpu_memory)
    p = plan(recipe, gpus, memory)
    found = suggest(recipe, gpus, memory) if suggestions and not p.fits else None
    if as_json:
        return json.dumps({**p.as_dict(), "suggestions": found}, indent=1)
    return report(p, found)
