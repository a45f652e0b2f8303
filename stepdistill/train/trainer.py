"""The one training loop: iterations x phases, on accelerate.

Each iteration asks the objective for its phases (which network updates, with which loss) and runs them in order,
passing detached generator samples from one phase to the next so no phase generates twice. Around that sit EMA,
gradient clipping, a non-finite guard, atomic checkpoints and logging. Rerunning the same command resumes from the
newest intact checkpoint and continues exactly as an uninterrupted run would (bitwise on CPU).
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from .. import parallel
from .. import recipe as recipe_mod
from ..errors import NonFiniteError
from ..kernels import configure_networks
from ..models.generator import Generator
from ..models.lora import load_saved_state, saved_state
from ..models.score import student_guidance, warm_start_guidance
from ..objectives.base import Batch, Nets, Objective
from ..recipe import Recipe, RecipeError
from ..registry import get
from ..teachers import Teacher, build_teacher
from .ema import EMA
from .state import (
    RunFolderError,
    list_checkpoints,
    load_latest,
    non_finite,
    prefixed,
    run_lock,
    save_checkpoint,
    unprefixed,
)


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT (Ctrl-C) or SIGTERM after saving a checkpoint; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def locked(outdir: Path):
    """Hold a run folder (state.run_lock, taken by process 0) for a block; every process fails when it is held."""
    stack, error = ExitStack(), None
    if parallel.is_main():
        try:
            stack.enter_context(run_lock(outdir))
        except RunFolderError as e:
            error = e
    if not parallel.all_true(error is None):
        raise error or RunFolderError(f"{outdir} cannot be held (see process 0's error)")
    with stack:
        yield


@contextmanager
def stop_requests():
    """Within the block SIGINT and SIGTERM only set the returned list's first element to the signal, so the loop
    stops between iterations (weights and random state of the same iteration); a second SIGINT stops at once,
    without a checkpoint. Outside the main thread (where Python delivers no signals) nothing changes."""
    got = [0]
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum, frame):
        if got[0] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        got[0] = signum
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this iteration with a checkpoint (Ctrl-C again "
                   "stops at once, without one)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class Built:
    teacher: Teacher
    nets: Nets
    objective: Objective
    data: object | None = None  # real samples (`sample(n, cond)`) when the objective needs them
    classes: list[int] | None = None  # an MSD student's classes: conditions are drawn uniformly from these only
    device: torch.device = torch.device("cpu")  # where the networks compute (`to`)

    def to(self, device: torch.device) -> Built:
        """Move every network (teacher, trained networks, the objective's own) to `device`; batches then arrive
        there. Conditions and real samples are still drawn on the CPU, so a run draws the same numbers anywhere."""
        self.teacher.to(device)
        for name in ("generator", "fake_score", "discriminator"):
            net = getattr(self.nets, name)
            if net is not None:
                net.to(device)
        self.objective.to(device)
        self.device = torch.device(device)
        return self

    def sample_cond(self, n: int) -> torch.Tensor | None:
        return self.teacher.sample_cond(n, classes=self.classes)

    def batch(self, n: int) -> Batch:
        """One iteration's conditions and, for objectives that need them, real samples with the same conditions."""
        cond = self.sample_cond(n)
        x0 = self.data.sample(n, cond) if self.objective.uses_data else None
        to = lambda x: None if x is None else x.to(self.device)  # noqa: E731
        return Batch(n=n, cond=to(cond), x0=to(x0))

    def micro_batches(self, n: int, k: int) -> list[Batch]:
        """A global batch of n in k micro-batches, each cut into the processes' rows (parallel.py): micro-batch j
        holds the same rows whatever the number of processes."""
        return [Batch(parallel.local_batch(b.n), parallel.rows(b.cond), parallel.rows(b.x0))
                for b in self.batch(n).split(k)]


def build(recipe: Recipe, classes: list[int] | None = None) -> Built:
    """Teacher, networks (generator and fake score start from the teacher), real data and objective for a recipe.
    Everything a recipe lacks (real data, a network that can carry a discriminator) is reported here, before any
    training starts. `classes`: train one MSD student, on these classes only."""
    from ..models.discriminator import TeacherFeatureDiscriminator, build_discriminator

    teacher = build_teacher(recipe.teacher)
    check_generator(recipe, teacher)
    check_eval(recipe, teacher)
    obj_cls = get("objective", recipe.objective.name)
    needs = obj_cls.needs_for(recipe.objective)
    unknown = set(needs) - {"teacher", "fake_score", "discriminator", "data"}
    if unknown:
        raise RecipeError(f"objective {recipe.objective.name} needs {sorted(unknown)}, which this toolkit cannot "
                          "build yet")
    generator = Generator.from_config(student_guidance(teacher.trainable_network(recipe.generator), recipe.objective),
                                      recipe.generator)
    on_teacher = obj_cls.discriminator_on == "teacher"
    fake = (teacher.trainable_network(recipe.generator, seed=1)
            if "fake_score" in needs or ("discriminator" in needs and not on_teacher) else None)
    disc = None
    if "discriminator" in needs:
        try:
            disc = TeacherFeatureDiscriminator(teacher.feature_network()) if on_teacher else build_discriminator(fake)
        except ValueError as e:
            raise RecipeError(f"objective {recipe.objective.name} (as configured) needs a discriminator: {e}") from None
    data = real_data(recipe, teacher, f"objective {recipe.objective.name} (as configured)") if "data" in needs \
        else None
    nets = Nets(teacher=teacher.score, generator=generator, fake_score=fake, discriminator=disc)
    return Built(teacher, nets, obj_cls(recipe.objective, nets, teacher.shape), data, classes)


def check_fsdp(recipe: Recipe) -> None:
    """train.fsdp against the combinations it does not support; a RecipeError naming the fix."""
    if not recipe.train.fsdp:
        return
    if recipe.generator.lora_rank:
        raise RecipeError(f"train.fsdp shards fully fine-tuned networks, but generator.lora_rank="
                          f"{recipe.generator.lora_rank}: a LoRA generator and fake score share the teacher's frozen "
                          "base, which sharding each network would copy. Set train.fsdp=false (a LoRA run's trained "
                          "state is small; train.teacher_dtype=bf16 and train.gradient_checkpointing save memory)")
    if recipe.train.compile:
        raise RecipeError("train.fsdp together with train.compile is not supported: set one of them to false")


def check_eval(recipe: Recipe, teacher: Teacher) -> None:
    """eval.n and eval.curve_n against the teacher's metric, before any training: the Fashion FD's covariance of the
    classifier's features needs more samples than features."""
    from ..eval.features import FashionClassifier

    e, d = recipe.eval, FashionClassifier.num_features
    if teacher.domain != "fashion-mnist":
        return
    for key, n, used in (("eval.n", e.n, e.at_end and "domain" in e.metrics), ("eval.curve_n", e.curve_n,
                                                                                e.curve_every > 0)):
        if used and n <= d:
            raise RecipeError(f"{key}={n} is too few for the Fashion FD (a covariance of {d} classifier features): "
                              f"set {key} to more than {d}")


def check_generator(recipe: Recipe, teacher: Teacher) -> None:
    """generator.students / width / tsm_steps against the teacher; a RecipeError naming the fix."""
    g = recipe.generator  # (its ranges, e.g. students >= 1, are checked with the recipe: recipe.check_ranges)
    if g.students > 1 and teacher.num_classes is None:
        fix = " or teacher.conditional=true" if recipe.teacher.name == "gmm" else ""
        raise RecipeError(f"generator.students={g.students} splits the classes among students (MSD), but teacher "
                          f"{recipe.teacher.name!r} is unconditional: set generator.students=1{fix}")
    if teacher.num_classes is not None and g.students > teacher.num_classes:
        raise RecipeError(f"generator.students={g.students} is larger than the number of conditions "
                          f"({teacher.num_classes} classes), so some student would have no class: set "
                          f"generator.students to at most {teacher.num_classes}")
    if not 0 < g.width <= 1:
        raise RecipeError(f"generator.width must be in (0, 1] (the student's share of the teacher's channels), got "
                          f"{g.width}")
    if g.tsm_steps < 0:
        raise RecipeError(f"generator.tsm_steps must be >= 0, got {g.tsm_steps}")
    if g.lora_rank < 0 or (g.lora_rank and g.width < 1):
        raise RecipeError(f"generator.lora_rank={g.lora_rank}: give a rank >= 1 (or 0 for full fine-tuning), and "
                          "keep generator.width=1 with LoRA (an adapter needs the teacher's own weights)")
    if g.width < 1 and g.tsm_steps == 0:
        raise RecipeError(f"generator.width={g.width} builds a randomly initialised student, which must first learn "
                          "the teacher by teacher score matching: set generator.tsm_steps (e.g. "
                          "generator.tsm_steps=500)")


def real_data(recipe: Recipe, teacher: Teacher, purpose: str):
    """Real samples (`sample(n, cond)`) from data.path or the teacher's own data; `purpose` names who needs them."""
    from ..data.real import load_npz

    if recipe.data.path:
        return load_npz(recipe.data.path, teacher.shape, teacher.num_classes is not None)
    try:
        data = teacher.real_data()
    except FileNotFoundError as e:
        raise RecipeError(f"{purpose} needs real data: {e}") from None
    if data is None:
        raise RecipeError(f"{purpose} needs real data and teacher {recipe.teacher.name} has none built in: set "
                          f"data.path to an .npz with x (N, {', '.join(map(str, teacher.shape))}) in the teacher's "
                          "space" + (" and labels (N,)" if teacher.num_classes is not None else ""))
    return data


# keys a resumed run may change: the budget, how networks execute (same maths within bf16 tolerance), how often it
# logs, samples and checkpoints, and the final evaluation (not the curve's protocol: its points must compare)
RESUME_MAY_CHANGE = {("train", k) for k in ("steps", "max_minutes", "attention", "compile", "gradient_checkpointing",
                                               "fsdp", "log_every", "sample_every", "checkpoint_every",
                                               "keep_checkpoints", "on_collapse", "max_rollbacks")} | \
    {("eval", k) for k in ("n", "seed", "teacher_nfe", "guidance_scale", "batch_size", "at_end", "metrics",
                           "fid_backend", "inception", "reference", "kid_subset_size")}


def check_resumable(outdir: Path, recipe: Recipe) -> None:
    """A rerun must use the same recipe as the run it resumes (budget and execution keys may change)."""
    saved_path = outdir / "recipe.yaml"
    if not saved_path.exists() or not any(list_checkpoints(c) for c in outdir.rglob("checkpoints")):
        return  # nothing to resume (a run that failed before its first checkpoint): this recipe starts afresh
    saved = recipe_mod.to_dict(recipe_mod.load_recipe(saved_path))
    new = recipe_mod.to_dict(recipe)
    diffs = []
    for section in new:
        for key in set(new[section]) | set(saved.get(section, {})):
            if (section, key) in RESUME_MAY_CHANGE:
                continue
            if new[section].get(key) != saved.get(section, {}).get(key):
                diffs.append(f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {new[section].get(key)!r}")
    if diffs:
        raise RecipeError(f"{outdir} holds a run with a different recipe ({'; '.join(diffs)}). Rerun with the same "
                          "recipe to resume (train.steps, train.max_minutes, eval.* and how often it logs may change; "
                          "`stepdistill eval --run` re-scores), or choose another --outdir.")


class Trainer:
    def __init__(self, recipe: Recipe, outdir: str | Path, quiet: bool = False,
                 classes: list[int] | None = None) -> None:
        """`classes`: train one MSD student on these classes only (no evaluation at the end: the ensemble is
        evaluated by train_students)."""
        self.recipe, self.cfg, self.outdir = recipe, recipe.train, Path(outdir)
        self.classes = classes
        # bf16 is applied with torch.autocast below rather than Accelerator(mixed_precision=...): accelerate's state is
        # a process-wide singleton that refuses a second Trainer with another precision (notebooks, tests).
        parallel.init()
        self.quiet = quiet or not parallel.is_main()  # one progress bar, from process 0
        # one GPU per process where CUDA is present (accelerate picks cuda:LOCAL_RANK), else the CPU; hide GPUs with
        # CUDA_VISIBLE_DEVICES='' to train on the CPU
        # mixed_precision="no": `accelerate launch` exports the user's accelerate config, and with fp16 on a GPU
        # accelerator.backward would scale every loss by a GradScaler that nothing here unscales (train.precision rules)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        parallel.local_batch(self.cfg.batch_size)  # a batch that does not split is an error before building
        k = self.cfg.grad_accum
        if k < 1 or self.cfg.batch_size % (k * parallel.world()):
            raise RecipeError(f"train.grad_accum={k} must be >= 1 and split train.batch_size={self.cfg.batch_size} "
                              f"into micro-batches of equal rows on each of the {parallel.world()} processes: "
                              f"train.batch_size must be a multiple of {k} x {parallel.world()}")
        check_fsdp(recipe)
        # build-time random initialisations (discriminator heads) from train.seed: torch seeds its default stream
        # differently in every process, so without this no two runs, nor two processes, would start alike
        torch.manual_seed(self.cfg.seed)
        self.built = build(recipe, classes).to(self.accelerator.device)
        self.nets, self.objective = self.built.nets, self.built.objective
        self.ema = EMA(self.nets.generator, self.cfg.ema) if self.cfg.ema > 0 else None
        # after the EMA copy: a copy of a compiled network would run the original (kernels/execution.py)
        self.execution = configure_networks(self.nets, self.cfg, also=(self.ema.model,) if self.ema else ())
        self.step, self.nonfinite = 0, 0
        self.last_logs: dict[str, float] = {}  # latest value of every logged quantity (saved with checkpoints)
        self._broadcast()  # every process starts from process 0's weights
        self.sharded = self.cfg.fsdp and parallel.world() > 1
        if self.sharded:  # before the optimizers: they hold the sharded parameters
            for net in self._sharded_networks():
                parallel.shard(net)
        self._param_lists: dict[str, list[torch.nn.Parameter]] = {}
        self.optimizers = {name: self._optimizer(name) for name in self.objective.trains}

    def _sharded_networks(self) -> list[torch.nn.Module]:
        """What train.fsdp shards: the networks' callable parts (a Generator's network, not its wrapper), with the
        EMA copy sliced like the generator. Discriminator heads and an objective's own modules are small: each
        process holds them whole and their gradients are averaged as without FSDP."""
        nets = [self.nets.teacher, self.nets.generator.net, self.nets.fake_score,
                self.ema.model.net if self.ema is not None else None]
        return [n for n in nets if n is not None]

    def _sharding_note(self) -> str:
        if not self.sharded:
            return ""
        params = [p for net in self._sharded_networks() for p in net.parameters()]
        held = sum(p.to_local().numel() for p in params if parallel.is_sharded(p))
        return f"; FSDP: each holds {held:,} of the {sum(p.numel() for p in params):,} sharded networks' weights"

    def _state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The tensors a checkpoint saves, by role (live: writing into them changes the run)."""
        mods = {name: self.nets.get(name) for name in self.objective.trains}
        if self.ema is not None:
            mods["ema"] = self.ema.model
        tensors = {name: [*m.parameters(), *m.buffers()] for name, m in mods.items()}
        return {**tensors, "objective": list(self.objective.state_dict().values())}

    def _broadcast(self) -> None:
        for tensors in self._state_tensors().values():
            parallel.broadcast(tensors)

    def _parameters(self, name: str) -> list[torch.nn.Parameter]:
        """A trained network's parameters plus those the objective trains with it (listed once: walking a UNet's
        modules every phase costs milliseconds)."""
        if name not in self._param_lists:
            self._param_lists[name] = [*self.nets.get(name).parameters(), *self.objective.parameters(name)]
        return self._param_lists[name]

    def _optimizer(self, name: str) -> torch.optim.Optimizer:
        lr = self.cfg.lr if name == "generator" else (self.cfg.fake_lr or self.cfg.lr)
        params = [p for p in self._parameters(name) if p.requires_grad]
        # foreach: one update over the tensor list, torch's default on GPUs; on the CPU torch would update one tensor
        # at a time (about 5% of a Fashion-MNIST step) to the same numbers, bit for bit in torch 2.14. It cannot mix
        # sharded and whole tensors (FSDP with an objective's own module, sCM's weighting): those go one at a time
        mixed = len({parallel.is_sharded(p) for p in params}) > 1
        return torch.optim.AdamW(params, lr=lr, betas=tuple(float(b) for b in self.cfg.betas),
                                 weight_decay=self.cfg.weight_decay, foreach=not mixed)

    # ---- state ---------------------------------------------------------------------------------------------
    def _weights(self) -> dict[str, torch.Tensor]:
        w = {}
        for name in self.objective.trains:
            w.update(prefixed(name, saved_state(self.nets.get(name))))
        if self.ema is not None:
            w.update(prefixed("ema", saved_state(self.ema.model)))
        w.update(prefixed("objective", self.objective.state_dict()))
        return w

    def save(self) -> None:
        """Write a checkpoint (process 0; every process must call this: they check they are in sync first and
        gather sharded tensors whole, so a checkpoint is the same with or without train.fsdp)."""
        for name, tensors in self._state_tensors().items():
            parallel.check_in_sync(tensors, name)
        weights, optimizers = parallel.full((self._weights(), {k: o.state_dict() for k, o in self.optimizers.items()}))
        bad = non_finite(weights) if parallel.is_main() else []
        if not parallel.all_true(not bad):
            raise NonFiniteError(f"the weights hold non-finite values at iteration {self.step} ({len(bad)} tensors, "
                                 f"e.g. {bad[0] if bad else 'on process 0'}), so they were not saved; "
                                 f"{self._newest_good()}. Try a lower train.lr or train.precision=fp32.")
        if parallel.is_main():
            state = {"optimizers": optimizers, "rng": torch.get_rng_state(), "nonfinite": self.nonfinite,
                     "last_logs": self.last_logs}
            save_checkpoint(self.outdir / "checkpoints", self.step, weights, state, self.cfg.keep_checkpoints)
        parallel.barrier()

    def _newest_good(self) -> str:
        saved = list_checkpoints(self.outdir / "checkpoints")
        return f"the newest good checkpoint is {saved[-1]}" if saved else "the run has no checkpoint yet"

    def restore(self) -> bool:
        found = load_latest(self.outdir / "checkpoints")
        if found is None:
            saved = list_checkpoints(self.outdir / "checkpoints")
            if saved:  # starting over would overwrite them and the run's logs: refuse, lose nothing
                raise RecipeError(f"all {len(saved)} checkpoints in {self.outdir / 'checkpoints'} are damaged (see the "
                                  "warnings above); move them away to start the run over, or choose another --outdir")
            return False
        step, weights, state = found
        for name in self.objective.trains:
            net, optimizer = self.nets.get(name), self.optimizers[name]
            load_saved_state(net, parallel.sharded_state(net, unprefixed(name, weights)))
            optimizer.load_state_dict(parallel.sharded_optimizer_state(optimizer, state["optimizers"][name]))
        if self.ema is not None:
            load_saved_state(self.ema.model, parallel.sharded_state(self.ema.model, unprefixed("ema", weights)))
        self.objective.load_state_dict(unprefixed("objective", weights))
        torch.set_rng_state(state["rng"])
        self.step, self.nonfinite = step, int(state["nonfinite"])
        self.last_logs = dict(state.get("last_logs", {}))
        return True

    # ---- one iteration ---------------------------------------------------------------------------------------
    def _lr_scale(self) -> float:
        """train.warmup's linear ramp, then train.lr_decay from 1 at the end of the warm-up to 0 at train.steps."""
        c = self.cfg
        if c.warmup > 0 and self.step < c.warmup:
            return (self.step + 1) / c.warmup
        if c.lr_decay == "none":
            return 1.0
        done = (self.step - c.warmup) / max(c.steps - c.warmup, 1)
        return 1.0 - done if c.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))

    def train_step(self) -> dict[str, float]:
        micro = self.built.micro_batches(self.cfg.batch_size, self.cfg.grad_accum)
        logs: dict[str, float] = {}
        samples: list = [None] * len(micro)  # each micro-batch's samples, handed from phase to phase
        for phase in self.objective.phases(self.step):
            names = phase.networks
            for name in names:
                for group in self.optimizers[name].param_groups:
                    group.setdefault("base_lr", group["lr"])
                    group["lr"] = group["base_lr"] * self._lr_scale()
            ok = True
            for j, batch in enumerate(micro):  # gradients of the mean loss over the micro-batches
                # no weight-cast cache: torch before pytorch#165068 reused casts made under no_grad (a few-step
                # generator's backward simulation) in the graded pass, and those weights got no gradient
                with torch.autocast(self.accelerator.device.type, torch.bfloat16,
                                    enabled=self.cfg.precision == "bf16", cache_enabled=False):
                    out = phase.loss(batch, samples[j])
                samples[j] = out.samples if out.samples is not None else samples[j]
                for k, v in out.logs.items():
                    logs[k] = (logs.get(k, 0.0) if j else 0.0) + v / len(micro)
                ok = parallel.all_true(bool(torch.isfinite(out.loss)))  # every process skips, or none does
                if not ok:
                    break
                self.accelerator.backward(out.loss / len(micro))
            if ok:
                max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
                for name in names:
                    params = [p for p in self._parameters(name) if p.grad is not None]
                    parallel.average_gradients(params)
                    norm = parallel.clip_grad_norm(params, max_norm) if params else torch.tensor(0.0)
                    ok = ok and bool(torch.isfinite(norm))
                    logs[f"grad_norm/{name}"] = float(norm)
            if ok:
                for name in names:
                    self.optimizers[name].step()
            else:  # a non-finite loss or gradient never reaches the weights
                self.nonfinite += 1
                if self.nonfinite > self.cfg.max_nonfinite:
                    raise NonFiniteError(
                        f"{self.nonfinite} phases had a non-finite loss or gradient (limit train.max_nonfinite="
                        f"{self.cfg.max_nonfinite}); last at iteration {self.step} ({'+'.join(names)}); "
                        f"{self._newest_good()}. Try a lower train.lr, "
                        "train.precision=fp32, or a smaller train.grad_clip.")
            for n in self.objective.trains:  # a loss may reach other trained networks too: clear every grad
                for p in self._parameters(n):
                    p.grad = None
            if ok and "generator" in names and self.ema is not None:
                self.ema.update(self.nets.generator)
        logs["nonfinite"] = float(self.nonfinite)
        return logs

    def teacher_score_matching(self) -> None:
        """MSD's first stage for a smaller student: generator.tsm_steps of TSM (train/tsm.py) on real samples of this
        run's classes; the fake score, when the objective has one, then starts from the pretrained student."""
        from .tsm import teacher_score_matching

        data = self.built.data if self.built.data is not None else real_data(self.recipe, self.built.teacher,
                                                                             "generator.tsm_steps")
        loss = teacher_score_matching(self.nets.generator.net, self.nets.teacher, data, self.built.sample_cond,
                                      self.cfg.lr, self.recipe.generator.tsm_steps, self.cfg.batch_size, self.quiet)
        self.last_logs["loss/tsm"] = loss
        if self.nets.fake_score is not None:
            self.nets.fake_score.load_state_dict(self.nets.generator.net.state_dict())

    # ---- the loop ----------------------------------------------------------------------------------------------
    def student(self) -> Generator:
        return self.ema.model if self.ema is not None else self.nets.generator

    def sample_grid(self, tag: str) -> None:
        """samples/<tag>.png from process 0 (every process must call this: sharded networks are gathered first)."""
        from ..eval.samples import save_samples

        with self.gathered():
            if parallel.is_main():
                save_samples(self, tag)

    def gathered(self):
        """A block in which the student and the teacher are whole on every process, even when sharded, so evaluation
        and sample grids need not run in step on every process (every process must enter it)."""
        return parallel.gathered(self.student(), self.nets.teacher)

    def curve_point(self, path: Path, train_seconds: float) -> None:
        """Append {step, time (training seconds), metric} to curve.jsonl; the evaluation's own time is not charged."""
        from ..eval.harness import curve_score

        t0 = time.time()
        with self.gathered():
            score = curve_score(self.recipe.eval, self.built.teacher, self.student(), self.classes)
        if parallel.is_main():
            _append_jsonl(path, {"step": self.step, "time": round(train_seconds, 3), **score})
        self.paused += time.time() - t0

    def run(self) -> dict | None:
        """Train (or resume) to train.steps, holding the run folder (state.run_lock) throughout."""
        with locked(self.outdir):
            return self._run()

    def _run(self) -> dict | None:
        from ..eval.harness import evaluate, write_metrics

        main = parallel.is_main()
        check_resumable(self.outdir, self.recipe)
        parallel.barrier()  # every process has read the saved recipe before process 0 rewrites it
        if main:
            (self.outdir / "recipe.yaml").write_text(recipe_mod.dump(self.recipe))
        torch.manual_seed(self.cfg.seed)  # after building: only the loop's draws depend on this stream
        resumed = self.restore()
        start, self.paused = time.time(), 0.0  # train.max_minutes budgets the warm start too, not curve points

        def clock() -> float:
            return time.time() - start - self.paused
        g = self.recipe.generator
        if not resumed and (g.tsm_steps > 0 or g.warm_start_steps > 0):  # then checkpoint: a crash never redoes them
            if g.tsm_steps > 0:
                self.teacher_score_matching()
            if g.warm_start_steps > 0:
                from .warm_start import regression_warm_start

                loss = regression_warm_start(self.nets.generator, self.built.teacher, g.warm_start_lr or self.cfg.lr,
                                             g.warm_start_steps, g.warm_start_pairs, g.warm_start_nfe,
                                             self.cfg.batch_size, self.quiet, classes=self.classes,
                                             guidance_scale=warm_start_guidance(self.recipe.objective))
                self.last_logs["loss/warm_start"] = loss
            if self.ema is not None:
                self.ema.model.load_state_dict(self.nets.generator.state_dict())
            self._broadcast()  # every process ran the same warm start: keep them bitwise equal all the same
            self.save()
        stats_path, curve_path = self.outdir / "stats.jsonl", self.outdir / "curve.jsonl"
        if main:
            for path in (stats_path, curve_path):
                dropped = _truncate_stats(path, self.step)
                if dropped and not resumed:
                    warnings.warn(f"{self.outdir} has no checkpoint to resume from, so the run starts over at "
                                  f"iteration 0: {dropped} lines of an earlier run's {path.name} are dropped",
                                  stacklevel=2)
        curve_every = self.recipe.eval.curve_every if self.built.teacher.domain != "none" else 0
        from .watch import Watch

        watch = Watch(self) if self.cfg.watch_every else None  # teacher samples to watch the student against
        if watch is not None and self.step == 0:  # (a warm start's checkpoint is at 0, before this check)
            watch.check()
        if curve_every and not resumed:
            self.curve_point(curve_path, clock())
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.outdir / "tb")) if main else None
        last = self.last_logs
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="distilling", unit="it", disable=self.quiet,
                   dynamic_ncols=True)
        if parallel.world() > 1 and not self.quiet:
            tqdm.write(f"{parallel.world()} processes, {parallel.local_batch(self.cfg.batch_size)} of the "
                       f"train.batch_size={self.cfg.batch_size} samples each{self._sharding_note()}")
        if resumed and not self.quiet:
            tqdm.write(f"resumed from iteration {self.step} in {self.outdir / 'checkpoints'}")
        loop_start, first = clock(), self.step
        with stop_requests() as stop:
            try:
                while self.step < self.cfg.steps:
                    logs = self.train_step()
                    self.step += 1
                    last.update(logs)  # keep each value's latest reading: generator losses only occur every few steps
                    if watch is not None and self.step % self.cfg.watch_every == 0:
                        watch.check()  # before this iteration's log line and checkpoint: a rollback is in both
                    if self.cfg.max_minutes:  # the bar ends where the run will: at train.steps, or where the budget
                        rate = (self.step - first) / max(clock() - loop_start, 1e-9)  # runs out at the rate so far
                        left = max(self.cfg.max_minutes * 60 - clock(), 0.0)
                        bar.total = min(self.cfg.steps, self.step + int(rate * left))
                    bar.update(1)
                    bar.set_postfix({**{k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss/")},
                                     **(watch.postfix() if watch is not None else {})})
                    if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                        values = parallel.mean_values(last)  # each process logged its own rows' losses
                        if main:
                            _append_jsonl(stats_path, {"step": self.step, "time": round(clock(), 3), **values})
                        if writer is not None:
                            for k, v in values.items():
                                writer.add_scalar(k, v, self.step)
                    if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                        self.save()
                    if self.cfg.sample_every and self.step % self.cfg.sample_every == 0:
                        self.sample_grid(f"step_{self.step:07d}")
                    if curve_every and self.step % curve_every == 0:
                        self.curve_point(curve_path, clock())
                    if not parallel.all_true(not stop[0]):  # a signal (on any process): stop here, resumable
                        if not (self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0):
                            self.save()
                        name = signal.Signals(stop[0] or signal.SIGTERM).name
                        if main:
                            tqdm.write(f"{name} at iteration {self.step}: checkpoint saved in "
                                       f"{self.outdir / 'checkpoints'}; rerun the same command to resume")
                        raise Interrupted(stop[0] or signal.SIGTERM)
                    if self.cfg.max_minutes and not parallel.all_true(clock() <= self.cfg.max_minutes * 60):
                        bar.total = self.step  # the budget may run out inside a checkpoint, after the estimate above
                        bar.refresh()
                        if main:
                            tqdm.write(f"stopping at iteration {self.step}: train.max_minutes={self.cfg.max_minutes} "
                                       "reached")
                        break
            finally:
                bar.close()
                if writer is not None:
                    writer.close()
        self.save()
        if curve_every and self.step % curve_every:
            self.curve_point(curve_path, clock())
        values = parallel.mean_values(last)
        self.sample_grid("final")
        if main:
            summary = {"iterations": self.step, "train_seconds": round(clock(), 1), **values}
            (self.outdir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        parallel.barrier()  # the run's files are complete for every process once run() returns
        if not self.recipe.eval.at_end or self.classes is not None:
            return None
        with self.gathered():
            metrics = evaluate(self.recipe, self.built.teacher, self.student(), quiet=self.quiet)
        if main:
            write_metrics(self.outdir, metrics)
        return metrics


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_stats(path: Path, step: int) -> int:
    """Drop log lines past the resumed iteration, so a resumed run's stats.jsonl reads like an uninterrupted one's;
    returns how many were dropped. A torn last line (a write cut short by a crash or a full disk) is dropped with a
    warning; a bad line elsewhere is an error naming it."""
    if not path.exists():
        return 0
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    keep = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}, line {i + 1}, is not a JSON record: repair or delete that line, "
                                 "then rerun") from None
            warnings.warn(f"{path}: dropping its torn last line (a write cut short): {line[:60]!r}", stacklevel=2)
            continue
        if record["step"] <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))
    return len(lines) - len(keep)


def train(recipe: Recipe, outdir: str | Path, quiet: bool = False) -> dict | None:
    """Train (or resume) a run in `outdir`; returns the metrics written to metrics.json (None if eval.at_end is off).
    With generator.students = K > 1, K ordinary runs in outdir/students/k/ and the routed ensemble's metrics
    (train/students.py)."""
    parallel.init()
    if recipe.generator.students != 1:
        from .students import train_students

        return train_students(recipe, outdir, quiet=quiet)
    return Trainer(recipe, outdir, quiet=quiet).run()
