"""Data parallelism across processes (`accelerate launch` or `torchrun`): one global batch, split by rows.

Every process holds the same networks and draws from the same random stream. Each per-sample random tensor is
drawn at the size of the *global* batch on every process, and each process keeps its own rows (`randn`, `rand`,
`randn_like`, `rows`). Therefore:
- choices one iteration shares (a few-step generator's step index, a coin flip, a scalar time) agree on every process
  without communication, while every process trains on distinct samples;
- n processes compute exactly what one process computes with the same global batch, up to the order in which the
  gradient average sums; and the random state a checkpoint saves is the same whichever process saved it, so a run
  resumes with any number of processes;
- one process is the ordinary code path, bit for bit (every helper here is then the plain torch call).
`train.noise: device` (`keyed_noise`) gives these up for the per-sample noise, which each process then draws for its
own rows on its device from a keyed generator.

Gradients are averaged by `GradientSync` (bucketed all-reduces launched during the backward pass as each bucket's
gradients complete) rather than by wrapping networks in DistributedDataParallel: an objective's phases call the same
network several times, with and without gradients, which DDP's per-forward bookkeeping does not allow.

With `train.fsdp`, networks are instead sharded (`shard`, torch's FSDP2): each process holds a slice of every weight,
gradient and optimizer moment, a block's weights are gathered for its forward and backward, and FSDP averages the
gradients itself (reduce-scatter). Checkpoints hold whole tensors (`full`, `shard_like`), so a sharded run resumes
with any process count, sharded or not.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .devices import to_device
from .errors import RecipeError, SetupError

T = TypeVar("T")
BUCKET = 1 << 24  # elements per gradient all-reduce (64 MB in fp32)


def init() -> None:
    """Join the process group a launcher set up (no-op for a single process). On a machine without CUDA the processes
    talk over gloo: accelerate only picks its multi-CPU mode when told the run is on the CPU."""
    _state()
    if world() > 1 and not _leaving:
        _leaving.append(atexit.register(_leave))


_leaving: list = []


def finish(code: int) -> int:
    """The end of a successful command: with several processes, leave the process group together and exit at once.
    Python's interpreter teardown can otherwise abort a process in gloo's threads ("terminate called without an
    active exception", about one run in ten here, after all work is done; pytorch/pytorch#179291)."""
    if world() == 1:
        return code
    dist.barrier()
    _leave()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def compute_device() -> torch.device:
    """This process's device: its GPU (cuda:LOCAL_RANK) where CUDA is present, else the CPU. Hide the GPUs with
    CUDA_VISIBLE_DEVICES='' to compute on the CPU."""
    return _state().device


def _state():
    """accelerate's process state (it joins the launcher's process group on first use). One GPU per process: NCCL
    cannot share a GPU between two processes, so more processes than GPUs on a machine is an error naming the fixes.
    The group's timeout is an hour, not NCCL's 10 minutes: the other processes wait while process 0 alone writes a
    checkpoint or computes reference statistics."""
    from datetime import timedelta

    from accelerate import PartialState

    per_machine, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if torch.cuda.is_available() and per_machine > gpus:
        raise SetupError(f"{per_machine} processes on this machine but {gpus} GPU(s): NCCL cannot share a GPU "
                         f"between processes. Launch at most {gpus} per machine, or set CUDA_VISIBLE_DEVICES='' to "
                         "run them on the CPU (gloo)")
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=1))


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def local_batch(n: int, what: str = "train.batch_size") -> int:
    """This process's share of a global batch of n; an error naming the fix when n does not split evenly."""
    if n % world():
        raise RecipeError(f"{what}={n} is the global batch, split evenly over {world()} processes: use a multiple of "
                          f"{world()} (e.g. {what}={(n // world() + 1) * world()})")
    return n // world()


def rows(x: T) -> T:
    """This process's rows of a tensor that holds the global batch (None stays None)."""
    if x is None or world() == 1:
        return x
    n = local_batch(len(x), "the batch")
    return x[rank() * n:(rank() + 1) * n]


_keyed: list[torch.Generator] = []  # the generator of the current keyed_noise block


@contextmanager
def keyed_noise(device: torch.device, seed: int, *key: int) -> Iterator[None]:
    """train.noise: device. Inside, the draws that name a device (`randn`, `rand`, `randn_like`: the per-sample
    noise and times) take only this process's n rows, on that device, from a generator seeded by (seed, *key, rank):
    nothing is drawn on the host or copied from it, and nothing needs checkpointing (a resumed iteration re-derives
    its keys). Draws without a device (scalars and small per-sample choices) stay on the host's shared stream."""
    digest = hashlib.blake2b(repr((seed, *key, rank())).encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") >> 1)
    _keyed.append(generator)
    try:
        yield
    finally:
        _keyed.pop()


def randn(n: int, *shape: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
          ) -> torch.Tensor:
    """torch.randn(n, *shape) for this process's n rows, drawn as the global batch's rows (see the module doc), from
    the CPU's stream and then moved to `device`: the same numbers on any device, and a checkpoint's CPU random state
    resumes them exactly. Inside `keyed_noise`, this process's rows from its keyed generator."""
    if _keyed and device is not None:
        return torch.randn(n, *shape, dtype=dtype, device=device, generator=_keyed[-1])
    return to_device(rows(torch.randn(n * world(), *shape, dtype=dtype, device="cpu")), device)


def rand(n: int, *shape: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
         ) -> torch.Tensor:
    if _keyed and device is not None:
        return torch.rand(n, *shape, dtype=dtype, device=device, generator=_keyed[-1])
    return to_device(rows(torch.rand(n * world(), *shape, dtype=dtype, device="cpu")), device)


def randn_like(x: torch.Tensor) -> torch.Tensor:
    return randn(len(x), *x.shape[1:], dtype=x.dtype, device=x.device)


def all_finite(flag: torch.Tensor) -> torch.Tensor:
    """`flag` (a 0-d bool tensor) and-ed over the processes, on the device: nothing is read back to the host."""
    if world() == 1:
        return flag
    t = flag.to(_device(), torch.float32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.to(flag.device) > 0


def all_true(flag: bool) -> bool:
    """True only if `flag` (a host value: a signal, the clock) holds on every process, so all of them take the same
    branch. Agreed over a CPU (gloo) group: under NCCL a GPU tensor's read would make the host wait for the queue."""
    if world() == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0])
    dist.all_reduce(t, group=_host_group())
    return t.item() == 0


@functools.cache
def _host_group():
    """The default group where it already talks gloo; else a gloo group of the same processes (made once, by every
    process at its first all_true, which every process reaches at the same point)."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


class GradientSync:
    """Averages the gradients of `params` over processes, overlapped with the backward pass that makes them: buckets
    of about BUCKET elements, laid out in reverse parameter order (about the order backward finishes them), each
    all-reduced asynchronously, in order, as soon as its gradients and those of the buckets before it are accumulated
    (a post-accumulate-grad hook), while the backward pass goes on; `finish` waits for them and divides. Only the
    backward pass after `arm` (a phase's last micro-batch) launches anything, and only for the phase's own networks.

    The buckets are laid out over the parameters, not over the gradients a pass happened to make, so a process
    missing one (a phase that ran differently there) still makes the same collectives, zeros in its place, rather
    than hang; which gradients each process held travels in each bucket, ahead of its gradients. torch's
    DistributedDataParallel does this overlap too, but it wraps a module and keeps per-forward bookkeeping, and an
    objective's phases call one network several times, with and without gradients."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad and not is_sharded(p)]  # FSDP averages the sharded
        self.buckets: list[list[int]] = []
        size = 0  # elements in the newest bucket
        for i in reversed(range(len(self.params))):
            if not self.buckets or size + self.params[i].numel() > BUCKET:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(i)
            size += self.params[i].numel()
        self.bucket_of = {i: b for b, bucket in enumerate(self.buckets) for i in bucket}
        self.armed, self.waiting, self.launched = False, [], {}
        self.hooks = [p.register_post_accumulate_grad_hook(functools.partial(self._ready, i))
                      for i, p in enumerate(self.params)]

    def arm(self) -> None:
        """Launch each bucket's all-reduce during the next backward pass, as its gradients complete."""
        self.armed, self.waiting, self.launched = True, [len(b) for b in self.buckets], {}

    def _ready(self, i: int, _param: nn.Parameter) -> None:
        """A gradient is complete: launch every bucket, in order, whose gradients all are. In order, as DDP does:
        collectives pair up by the order each process issues them, so a process whose bucket waits for a gradient it
        never gets (launched at finish) must not let a later bucket go out before it."""
        if self.armed:
            self.waiting[self.bucket_of[i]] -= 1
            while len(self.launched) < len(self.buckets) and self.waiting[len(self.launched)] == 0:
                self._launch(len(self.launched))

    def _launch(self, b: int) -> None:
        """Bucket b's all-reduce, its gradients (zeros for a missing one) behind one flag per parameter: 1 where this
        process holds the gradient, so the sum says whether every process held the same ones."""
        params = [self.params[i] for i in self.buckets[b]]
        held = to_device(torch.tensor([float(p.grad is not None) for p in params]), params[0].device)
        flat = torch.cat([held, *((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                                  for p in params)])
        self.launched[b] = (dist.all_reduce(flat, async_op=True), flat)

    def finish(self) -> torch.Tensor:
        """Every bucket averaged (those not launched yet, now); returns a 0-d bool on the device, whether every
        process held the same gradients (nothing is read back: the trainer skips the update when it does not hold,
        and raises at its next log step)."""
        self.armed = False
        agreed = torch.ones((), dtype=torch.bool, device=_device())
        for b in range(len(self.launched), len(self.buckets)):
            self._launch(b)
        for b, (work, flat) in self.launched.items():
            work.wait()
            params = [self.params[i] for i in self.buckets[b]]
            held, grads = flat[:len(params)], flat[len(params):] / world()
            agreed &= ((held == 0) | (held == world())).all()
            for p, part in zip(params, grads.split([p.numel() for p in params])):
                if p.grad is not None:  # the zeros standing in for a missing gradient are dropped
                    p.grad.copy_(part.view_as(p.grad))
        self.launched = {}
        return agreed


def mean_values(values: dict[str, float]) -> dict[str, float]:
    """Each logged value averaged over processes (same keys on every process)."""
    if world() == 1 or not values:
        return values
    keys = sorted(values)  # the same order on every process
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    mean = {k: v / world() for k, v in zip(keys, t.tolist())}
    return {k: mean[k] for k in values}


def broadcast(tensors: list[torch.Tensor]) -> None:
    """Copy process 0's values of these tensors (in place) to every process."""
    if world() == 1:
        return
    with torch.no_grad():
        for t in tensors:
            if not is_sharded(t):  # a shard is each process's own slice
                dist.broadcast(t.data, 0)


def check_in_sync(tensors: list[torch.Tensor], what: str) -> None:
    """An error if the processes' copies of these tensors have drifted apart (a checksum, taken at checkpoints)."""
    tensors = [t for t in tensors if not is_sharded(t)]  # each process holds its own slice of a sharded one
    if world() == 1 or not tensors:
        return
    with torch.no_grad():
        s = torch.stack([t.detach().double().sum().to(_device()) for t in tensors]).sum().reshape(1)
    both = torch.cat([s, -s])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if not torch.isclose(both[0], -both[1], rtol=1e-9, atol=1e-6):
        raise RuntimeError(f"the processes' copies of the {what} differ (checksums {-both[1].item()} .. "
                           f"{both[0].item()}); the run cannot continue data-parallel")


def on_main(fn: Callable[[], T]) -> T:
    """fn() computed by process 0 alone and its result handed to every process (for metrics, file caches)."""
    if world() == 1:
        return fn()
    box = [fn() if is_main() else None]
    dist.broadcast_object_list(box, 0)
    return box[0]


def gather(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every process's list of tensors, concatenated in process order, on every process (moved to the CPU)."""
    if world() == 1:
        return parts
    out: list = [None] * world()
    dist.all_gather_object(out, [p.cpu() for p in parts])
    return [p for ps in out for p in ps]


def barrier() -> None:
    if world() > 1:
        dist.barrier()


# ---- sharding (train.fsdp) ---------------------------------------------------------------------------------------
def shard(module: nn.Module) -> None:
    """Shard a network over the processes with FSDP2 (torch's fully_shard): every block (each element of an outermost
    ModuleList: a UNet's down/up blocks, a transformer's blocks) is a unit whose weights are gathered for its forward
    and backward and freed after; the rest belongs to the network's own unit. Call the network itself (its forward),
    not its submodules, and on every process alike: each gather is a collective."""
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(module):
        fully_shard(block)
    fully_shard(module)


def _blocks(module: nn.Module) -> Iterator[nn.Module]:
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            yield from child
        else:
            yield from _blocks(child)


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def full(obj: T) -> T:
    """obj with every sharded tensor replaced by the whole tensor, through dicts, lists and tuples (a state dict, an
    optimizer's state). A collective: every process calls it with the same structure."""
    if isinstance(obj, DTensor):  # each whole tensor straight to the host: holding every weight and Adam moment whole
        return obj.full_tensor().cpu()  # on every GPU at once is the memory FSDP exists to save
    if isinstance(obj, dict):
        return type(obj)((k, full(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(full(v) for v in obj)
    return obj


def shard_like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A whole tensor cut into this process's slice the way `ref` is sharded (unchanged when ref is not sharded)."""
    return distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements) if is_sharded(ref) \
        else value


def sharded_state(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole-tensor state dict (a checkpoint's) made loadable into a sharded module: each entry sliced like the
    module's own (keys the module lacks are kept, so load_state_dict names them)."""
    own = module.state_dict()
    return {k: shard_like(v, own[k]) if k in own else v for k, v in state.items()}


def sharded_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """An optimizer state dict of whole tensors (a checkpoint's) with each parameter's moments sliced like the
    parameter, ready for optimizer.load_state_dict. The optimizer keeps its own `foreach` and `fused`: how it updates
    depends on this run's sharding and device (trainer.HOST_FREE), not the saved run's."""
    params = {i: p for saved, group in zip(state["param_groups"], optimizer.param_groups)
              for i, p in zip(saved["params"], group["params"])}
    groups = [{**saved, "foreach": group["foreach"], "fused": group["fused"]}
              for saved, group in zip(state["param_groups"], optimizer.param_groups)]
    return {**state, "param_groups": groups,
            "state": {i: {k: shard_like(v, params[i]) if v.dim() else v for k, v in s.items()}
                      for i, s in state["state"].items()}}


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ for parameters of which some may be sharded: the norm is the whole gradient's, and the
    scale is applied on the device, as torch's own does (nothing is read back: a non-finite norm gives non-finite
    gradients, whose update the trainer skips)."""
    sharded = [p.grad for p in params if is_sharded(p)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [p.grad for p in params if not is_sharded(p)]
    norms = [torch.nn.utils.get_total_norm(sharded).full_tensor()]
    if plain:
        norms.append(torch.nn.utils.get_total_norm(plain).to(norms[0].device))
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in sharded + plain:
        g.mul_(scale.to(g.device) if not is_sharded(g) else scale)
    return total


@contextmanager
def gathered(*modules: nn.Module | None) -> Iterator[None]:
    """Within this block every sharded module's weights stay whole on every process, so its forwards are local and
    the processes may do different work (sample grids on process 0, evaluation batches that do not split evenly).
    Entering and leaving are collectives. Without sharded modules, nothing happens."""
    units = [u for m in modules if m is not None for u in _units(m)]
    for u, inner in units:
        u.unshard()
        if inner:  # a network's own (outermost) unit keeps its weights after forward anyway: FSDP's choice for roots
            u.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for u, inner in units:
            u.reshard()
            if inner:
                u.set_reshard_after_forward(True, recurse=False)


def _units(module: nn.Module, inner: bool = False) -> Iterator[tuple[nn.Module, bool]]:
    """A module's FSDP units, each with whether it lies inside another unit."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        yield module, inner
        inner = True
    for child in module.children():
        yield from _units(child, inner)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
