"""`stepdistill bench --speed`: how much a training iteration costs beyond the network passes it must make.

For each recipe the real Trainer runs: `warmup` iterations, then `iterations` timed ones (the step time: objective,
losses, backward, clipping, optimiser, EMA, everything). Over the next `iterations` hooks record every pass of
the teacher, generator and fake-score networks (input shapes, whether gradients flow back through it, and into which
weights, forward-mode AD, autocast). Each recorded pass is then replayed alone, forward and, where the real one had
one, backward, and timed (the passes time). ratio = step time / passes time: 1.0 would mean the loop adds nothing to
the networks' own work; the target is at most 1.15. Discriminator heads, losses and optimiser steps count as
overhead. Pass mixes repeat with the objective's cycle (VSD: one generator update per `update_ratio` iterations), so
`iterations` should be a multiple of it (the default 10 is, for the shipped recipes).

Peak memory is CUDA's max_memory_allocated over the timed iterations; a CPU run says n/a (PyTorch keeps no CPU
allocator statistics, and process RSS mixes in everything else the process ever held).
"""
from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .kernels.execution import backbone
from .kernels.forward_ad import forward_ad_ready


@dataclass
class Pass:
    """One network call of a training iteration, as far as its cost goes."""

    role: str
    args: list  # tensors as (shape, dtype, device, values or None), other values as they were
    kwargs: dict
    grad_weights: bool  # the call built a graph into the network's weights
    grad_input: bool  # its input carried a graph (SiD backpropagates through the teacher into x_t)
    backward: bool = False  # its output required grad: the iteration backpropagated through it
    jvp: bool = False  # forward-mode AD (sCM's tangent)
    autocast: torch.dtype | None = None


@dataclass
class SpeedResult:
    recipe: str
    objective: str
    iterations: int
    step_ms: float
    passes_ms: float
    passes: dict[str, int] = field(default_factory=dict)  # per iteration: forward, backward, jvp
    peak_memory: float | None = None  # bytes (CUDA)

    @property
    def ratio(self) -> float:
        return self.step_ms / self.passes_ms if self.passes_ms > 0 else float("nan")


def _wrapped(x: torch.Tensor) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def _spec(v):
    if not isinstance(v, torch.Tensor):
        return v
    integer = not (v.is_floating_point() or v.is_complex())
    values = v.detach().clone() if integer and not _wrapped(v) else None  # labels: kept (an embedding lookup)
    return ("tensor", tuple(v.shape), v.dtype, v.device, values)


def _make(spec):
    if not (isinstance(spec, tuple) and len(spec) == 5 and spec[0] == "tensor"):
        return spec
    _, shape, dtype, device, values = spec
    if values is not None:
        return values
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return next(v for v in (out.values() if isinstance(out, dict) else out) if isinstance(v, torch.Tensor))


def networks(nets) -> dict[str, nn.Module]:
    """The backbones whose passes are counted, by role (a LoRA student's is its own module over shared weights)."""
    roles = {"teacher": nets.teacher, "generator": nets.generator.net, "fake_score": nets.fake_score}
    return {role: backbone(net) for role, net in roles.items() if net is not None}


@contextmanager
def recording(nets, device_type: str):
    """Record every pass of the run's networks into the yielded list."""
    passes: list[Pass] = []
    handles, depth = [], [0]  # a pass inside another (a network calling a network) is part of the outer one's cost
    for role, net in networks(nets).items():
        def pre(module, args, kwargs, role=role):
            depth[0] += 1
            if depth[0] > 1:
                return
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            passes.append(Pass(role, [_spec(a) for a in args], {k: _spec(v) for k, v in kwargs.items()},
                               torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()),
                               first is not None and first.requires_grad,
                               jvp=first is not None and _wrapped(first),
                               autocast=torch.get_autocast_dtype(device_type)
                               if torch.is_autocast_enabled(device_type) else None))

        def post(module, args, kwargs, out, role=role):
            depth[0] -= 1
            if depth[0] > 0:
                return
            rec = next(p for p in reversed(passes) if p.role == role)
            rec.backward = not rec.jvp and _first_tensor(out).requires_grad

        handles += [net.register_forward_pre_hook(pre, with_kwargs=True),
                    net.register_forward_hook(post, with_kwargs=True)]
    try:
        yield passes
    finally:
        for h in handles:
            h.remove()


def replay(net: nn.Module, p: Pass, device_type: str) -> None:
    """Run one recorded pass alone: the same shapes, grad mode and autocast; backward where the original had one."""
    args, kwargs = [_make(a) for a in p.args], {k: _make(v) for k, v in p.kwargs.items()}
    x = args[0]
    flags = [(q, q.requires_grad) for q in net.parameters()]
    for q, _ in flags:
        q.requires_grad_(p.grad_weights)
    amp = torch.autocast(device_type, p.autocast) if p.autocast is not None else nullcontext()
    try:
        with amp:
            if p.jvp:
                def f(x_):
                    return _first_tensor(net(x_, *args[1:], **kwargs))

                with torch.no_grad(), forward_ad_ready(net):  # as sCM runs it
                    torch.func.jvp(f, (x,), (torch.randn_like(x),))
            elif p.backward:
                x.requires_grad_(p.grad_input)
                out = _first_tensor(net(*args, **kwargs))
                out.backward(torch.ones_like(out))
            else:
                with torch.set_grad_enabled(p.grad_weights):
                    net(*args, **kwargs)
    finally:
        for q, flag in flags:
            q.requires_grad_(flag)
            q.grad = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer, iterations: int = 10, warmup: int = 3, recipe: str = "") -> SpeedResult:
    """Step time and isolated passes time of `trainer`'s iterations (see the module docstring)."""
    device = trainer.accelerator.device
    for _ in range(warmup):
        trainer.train_step()
        trainer.step += 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        trainer.train_step()
        trainer.step += 1
    _sync(device)
    step_time = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    with recording(trainer.nets, device.type) as passes:
        for _ in range(iterations):
            trainer.train_step()
            trainer.step += 1
    nets = networks(trainer.nets)
    for p in passes[:3]:  # warm the replay path (allocator, kernels picked for these shapes)
        replay(nets[p.role], p, device.type)
    total = 0.0
    for p in passes:
        _sync(device)
        t0 = time.perf_counter()
        replay(nets[p.role], p, device.type)
        _sync(device)
        total += time.perf_counter() - t0
    counts = {"forward": sum(not p.jvp for p in passes), "backward": sum(p.backward for p in passes),
              "jvp": sum(p.jvp for p in passes)}
    return SpeedResult(recipe, trainer.recipe.objective.name, iterations, 1e3 * step_time / iterations,
                       1e3 * total / iterations,
                       {k: v / iterations for k, v in counts.items()}, peak)


def measure_recipe(path: str, overrides: list[str] | None = None, iterations: int = 10, warmup: int = 3) -> SpeedResult:
    from .recipe import load_recipe
    from .training.trainer import Trainer

    recipe = load_recipe(path, ["eval.at_end=false", *(overrides or [])])
    torch.manual_seed(recipe.train.seed)
    with tempfile.TemporaryDirectory() as tmp:  # the Trainer writes nothing unless run(); it needs a folder name
        trainer = Trainer(recipe, Path(tmp) / "run", quiet=True)
        return measure(trainer, iterations, warmup, Path(path).stem)


def _memory(b: float | None) -> str:
    return "n/a (CPU)" if b is None else f"{b / 2**30:.2f} GiB"


def report(results: list[SpeedResult], command: str, target: float = 1.15) -> str:
    from .bench import machine

    lines = ["# Training-loop overhead", "", "Made by:", "", "```bash", command, "```", "",
             f"Machine: {machine()}.", "",
             "Step time: one training iteration of the real loop (mean over the timed iterations). Passes: the "
             "teacher / generator / fake-score passes those iterations made, each replayed alone (forward, plus "
             f"backward where the iteration had one). Target ratio: at most {target}.", "",
             "| recipe | objective | passes / it (fwd, bwd, jvp) | step ms | passes ms | ratio | peak memory |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        counts = ", ".join(f"{r.passes[k]:g}" for k in ("forward", "backward", "jvp"))
        flag = "" if r.ratio <= target else " (over)"
        lines.append(f"| `{r.recipe}` | {r.objective} | {counts} | {r.step_ms:.2f} | {r.passes_ms:.2f} | "
                     f"{r.ratio:.2f}{flag} | {_memory(r.peak_memory)} |")
    return "\n".join(lines) + "\n"


def run_speed(recipes: list[str], overrides: list[str] | None = None, iterations: int = 10, warmup: int = 3,
              out: str | Path | None = None, command: str = "") -> str:
    results = []
    for path in recipes:
        print(f"== timing {path}", flush=True)
        results.append(measure_recipe(path, overrides, iterations, warmup))
    text = report(results, command or "stepdistill bench --speed " + " ".join([*recipes, *(overrides or [])]))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text
