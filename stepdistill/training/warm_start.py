"""Regression warm start on teacher ODE pairs (DMD v1's regression loss; DMD2's SDXL one-step recipe).

Before distillation the generator is fitted to map noise z to the teacher's deterministic ODE output x0(z) for a
fixed set of pairs, with a mean squared error (DMD2 uses LPIPS on SDXL; MSE needs no extra network and suits small
images and vectors). The ODE runs with the objective's teacher guidance (`objective.guidance_scale`), so the start
is the guided teacher the objective distils. A K-step generator is warm-started on its first step. Off unless
`generator.warm_start_iterations`.

The pairs start from the generator's own input distribution. With `generator.start_noise=schedule` the ODE starts
at the start time from the generator's input sigma(start_t) z. With `pure` it starts at t = 1 from the t = 1 noise
the generator is given, whatever time the generator is conditioned on: DMD2's SDXL one-step student (timestep 399)
is pretrained on ODE pairs that start from pure noise at 999.

The ODE outputs are cached in $STEPDISTILL_CACHE/pairs/ (default ~/.cache/stepdistill), keyed by everything they
depend on: the ODE's starting points and conditions, the teacher's weights and schedule, the step count, the guidance,
this package's source and the device kind. The noise and conditions are drawn either way, so a run that finds its
pairs there continues exactly like one that computes them (the same random stream, the same pairs), and a sweep of
variants or a rerun pays for the teacher's ODE once. DMD precomputes its pairs offline the same way.
"""
from __future__ import annotations

import hashlib
import math
import time
import warnings

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm import tqdm

from .. import parallel
from ..diffusion.solvers import sample_ode, solver_for_nfe
from ..files import cache_dir, write_atomic
from ..hashing import source_sha256, update_with_tensor
from ..models.score import device_of

PROBE = 50  # a budgeted warm start fits its count to the time left every PROBE iterations


def teacher_pairs(teacher, n: int, nfe: int, batch_size: int = 256, classes: list[int] | None = None,
                  guidance_scale: float = 1.0, generator=None, cache: bool = False, quiet: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(z, cond, x0): n unit noises, their conditions (drawn from `classes` when given) and the teacher's ODE outputs
    (`nfe` evaluations: Heun when odd, as eval.teacher_nfe, else Euler; classifier-free guided with `guidance_scale`)
    from `generator`'s input for z (its prior) at its start time (start_noise schedule) or at t = 1 (pure; also
    without a generator). `cache`: read the outputs from the pairs cache (module docstring) when there, else write
    them there."""
    score = teacher.score
    prior = generator.prior if generator is not None else (lambda z: z * score.schedule.init_sigma)
    start = generator.times[0] if generator is not None and generator.start_noise == "schedule" else 1.0
    device = device_of(score)
    z = torch.randn(n, *teacher.shape).to(device)
    cond = teacher.sample_cond(n, classes=classes)
    cond = None if cond is None else cond.to(device)
    with torch.no_grad():
        x_start = prior(z)
        if cache:
            key = pairs_key(score, x_start, cond, nfe, guidance_scale, start, batch_size)
            path = cache_dir() / "pairs" / f"{key}.safetensors"
            x0 = read_pairs(path, n)
            if x0 is not None:
                return z, cond, x0.to(device)
        out = []
        solver, steps = solver_for_nfe(nfe)
        for i in tqdm(range(0, n, batch_size), desc=f"teacher ODE pairs ({solver}, {steps} steps)", disable=quiet,
                      leave=False):
            c = None if cond is None else cond[i:i + batch_size]
            x, _ = sample_ode(lambda x, t, c=c: score.guided(x, t, c, guidance_scale),
                              x_start[i:i + batch_size], score.schedule, steps, heun=solver == "heun", t_max=start)
            out.append(x)
    x0 = torch.cat(out)
    if cache:
        write_pairs(path, x0)
    return z, cond, x0


def pairs_key(score, x_start: torch.Tensor, cond: torch.Tensor | None, nfe: int, guidance_scale: float,
              start: float, batch_size: int) -> str:
    """SHA-256 of what the teacher's ODE outputs depend on: starting points, conditions, the score model's weights,
    buffers and settings (prediction, conditioning), its schedule's, the steps, guidance and start time, this
    package's source, and what changes their last bits (device kind, batch size)."""
    h = hashlib.sha256(f"pairs v1 {source_sha256()} {nfe} {float(guidance_scale)!r} {float(start)!r} "
                       f"{x_start.device.type} {batch_size}".encode())
    for where, value in settings(score) + [*score.named_parameters(), *score.named_buffers()]:
        h.update(where.encode())
        update_with_tensor(h, value) if torch.is_tensor(value) else h.update(repr(value).encode())
    update_with_tensor(h, x_start)
    if cond is not None:
        update_with_tensor(h, cond)
    return h.hexdigest()


def settings(score) -> list[tuple[str, object]]:
    """The plain settings of the score model, its schedule and every submodule (prediction kind, null label, a
    diffusers config, a mixture's std, ...): public attributes that are tensors or plain data; not private ones
    (caches), not objects whose repr names a memory address."""
    out = []
    for prefix, obj in [("schedule", score.schedule), *score.named_modules()]:
        for k, v in sorted(vars(obj).items()):
            if not k.startswith("_") and (torch.is_tensor(v) or isinstance(v, (bool, int, float, str, type(None))) or
                                          isinstance(v, (tuple, list, dict)) and " at 0x" not in repr(v)):
                out.append((f"{prefix}.{k}", v))
    return out


def read_pairs(path, n: int) -> torch.Tensor | None:
    """The cached ODE outputs at `path`, or None where there are none (or the file is unreadable: then it is said
    and they are computed again)."""
    if not path.exists():
        return None
    try:
        x0 = load_file(path)["x0"]
    except (SafetensorError, KeyError, OSError) as e:
        warnings.warn(f"ignoring the unreadable teacher-pairs cache file {path} ({e}); computing the pairs again",
                      stacklevel=3)
        return None
    return x0 if len(x0) == n else None


def write_pairs(path, x0: torch.Tensor) -> None:
    """Write atomically (several processes or runs may write the same pairs); a failed write (a full disk, a
    read-only cache) costs only the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic({"x0": x0.detach().to("cpu")}, path)
    except OSError as e:
        warnings.warn(f"could not cache the teacher pairs in {path} ({e}); training goes on without the cache",
                      stacklevel=3)


def regression_warm_start(generator, pairs: tuple, lr: float, steps: int, batch_size: int, quiet: bool = False,
                          decay: str = "none", seconds: float | None = None) -> tuple[float, int]:
    """Fit the generator's first step to teacher ODE `pairs` (teacher_pairs' (z, cond, x0)) for `steps` Adam
    iterations (its own optimiser, so distillation starts with fresh moments; `decay` cosine: the rate falls to 0 over
    them); returns the last loss and the iterations run.

    `seconds` (generator.warm_start_share of train.max_minutes, less what the run has spent): every PROBE iterations
    the iteration count is set to what fits at the rate of the last PROBE (at most `steps`), so a slow machine runs a
    shorter warm start whose cosine decay still ends at 0, and distillation keeps its share of the budget."""
    z, cond, target = pairs
    pairs = len(z)
    optimizer = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=lr)
    loss = torch.tensor(float("nan"))
    planned = steps
    start = probed = time.monotonic()
    if seconds is not None:  # each process read its own clock: agree first, or they would part at `steps = 0`
        seconds = parallel.mean_values({"seconds": seconds})["seconds"]
    if seconds is not None and seconds <= 0:
        steps = 0  # the teacher pairs took the warm start's share
    bar = tqdm(total=steps, desc="regression warm start", disable=quiet, leave=False)
    i = 0
    while i < steps:
        if decay == "cosine":
            optimizer.param_groups[0]["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * i / steps))
        idx = torch.randint(0, pairs, (min(batch_size, pairs),))
        x0 = generator.step(generator.prior(z[idx]), 0, None if cond is None else cond[idx])
        loss = (x0.float() - target[idx]).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        i += 1
        bar.update(1)
        if seconds is not None and i % PROBE == 0:  # again every PROBE: a machine's speed drifts in a run
            now = time.monotonic()
            # at the rate of the last PROBE iterations, up or down to at most the planned count: a slow start (the
            # first iterations', or a busy minute's) no longer cuts the whole warm start for good
            fit = i + max(int((seconds - (now - start)) * PROBE / (now - probed)), 0)
            steps = min(planned, int(parallel.mean_values({"fit": float(fit)})["fit"]))  # every process the same
            bar.total, probed = steps, now
    bar.close()
    generator.zero_grad(set_to_none=True)
    if i < planned and not quiet:
        tqdm.write(f"regression warm start: {i} of generator.warm_start_iterations={planned} fit its share of "
                   "train.max_minutes (generator.warm_start_share)")
    return float(loss.detach()), i
