"""One distillation run's training state and its iteration: networks (train/build.py), EMA, optimisers, checkpoints.

Each iteration asks the objective for its phases (which network updates, with which loss) and runs them in order,
passing detached generator samples from one phase to the next so no phase generates twice. Around that sit EMA,
gradient clipping, a non-finite guard and atomic checkpoints. `Trainer.run` runs the loop (train/loop.py: resume
checks, warm start, logging, checkpoint / sample / curve cadence, time budget, final evaluation); rerunning the same
command resumes from the newest intact checkpoint and continues exactly as an uninterrupted run would (bitwise on
CPU). Several students (MSD) are trained above this module, by train/students.py.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator

from .. import parallel
from ..errors import NonFiniteError
from ..kernels import configure_networks
from ..models.generator import Generator
from ..models.lora import load_saved_state, saved_state
from ..recipe import Recipe
from . import loop
from .build import build, check_batch, check_fsdp, check_trackers, real_data, resolve_eval
from .cadence import Clock, Interrupted  # noqa: F401  (Interrupted re-exported for callers of train.trainer)
from .ema import EMA
from .resume import newest_checkpoint
from .state import list_checkpoints, non_finite, prefixed, save_checkpoint, unprefixed

# Devices whose optimisers are fused AdamW, which skips a non-finite phase inside its kernel, so an iteration never
# waits for the host (Trainer._update). The CPU keeps foreach AdamW: the committed results were measured with it, fused
# rounds differently (by an ulp), and a CPU has no queue to wait for.
HOST_FREE = ("cuda",)


class Trainer:
    """One run: its built networks, EMA, optimisers, step and checkpoints; `train_step` is one iteration and `run`
    the whole loop (train/loop.py)."""

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
        check_trackers(self.cfg)
        # the trackers (train.log_with) write under the run folder: TensorBoard's events in OUTDIR/tb (loop.open_logs)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                                       log_with=self.cfg.log_with or None, project_dir=str(self.outdir))
        check_batch(self.cfg)
        check_fsdp(recipe)
        # build-time random initialisations (discriminator heads) from train.seed: torch seeds its default stream
        # differently in every process, so without this no two runs, nor two processes, would start alike
        torch.manual_seed(self.cfg.seed)
        self.built = build(recipe, classes).to(self.accelerator.device)
        self.recipe, note = resolve_eval(recipe, self.built.teacher)  # what the final evaluation can score
        if note and not self.quiet:
            print(f"note: {note}")
        self.nets, self.objective = self.built.nets, self.built.objective
        self.ema = EMA(self.nets.generator, self.cfg.ema) if self.cfg.ema > 0 else None
        # after the EMA copy: a copy of a compiled network would run the original (kernels/execution.py)
        self.execution = configure_networks(self.nets, self.cfg, also=(self.ema.model,) if self.ema else ())
        self.step = 0
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=self.accelerator.device)  # phases skipped
        self.disagreed = torch.zeros_like(self.nonfinite)  # phases whose gradients differed between processes
        self.lr_end = 0  # train.lr_decay_end=budget: the iteration where the budget should run out (0: not planned)
        self.last_logs: dict = {}  # latest value of every logged quantity, tensors until read (saved as numbers)
        self.clock = Clock()  # training seconds, for train.max_minutes and the logs (started by the loop)
        self.broadcast()  # every process starts from process 0's weights
        self.sharded = self.cfg.fsdp and parallel.world() > 1
        if self.sharded:  # before the optimizers: they hold the sharded parameters
            for net in self._sharded_networks():
                parallel.shard(net)
        self._param_lists: dict[str, list[torch.nn.Parameter]] = {}
        self.optimizers = {name: self._optimizer(name) for name in self.objective.trains}
        self.syncs = ({name: parallel.GradientSync(self._parameters(name)) for name in self.objective.trains}
                      if parallel.world() > 1 else {})  # gradient averages, overlapped with the backward pass
        self.host_free = all(o.defaults["fused"] for o in self.optimizers.values())  # train_step never reads back

    def _sharded_networks(self) -> list[torch.nn.Module]:
        """What train.fsdp shards: the networks' callable parts (a Generator's network, not its wrapper), with the
        EMA copy sliced like the generator. Discriminator heads and an objective's own modules are small: each
        process holds them whole and their gradients are averaged as without FSDP."""
        nets = [self.nets.teacher, self.nets.generator.net, self.nets.fake_score,
                self.ema.model.net if self.ema is not None else None]
        return [n for n in nets if n is not None]

    def sharding_note(self) -> str:
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

    def broadcast(self) -> None:
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
        # sharded and whole tensors (FSDP with an objective's own module, sCM's weighting): those go one at a time.
        # fused (HOST_FREE devices, sharded or not, but not mixed): one kernel that also skips a non-finite phase
        # itself (train_step)
        mixed = len({parallel.is_sharded(p) for p in params}) > 1
        fused = self.accelerator.device.type in HOST_FREE and not mixed
        return torch.optim.AdamW(params, lr=lr, betas=tuple(float(b) for b in self.cfg.betas),
                                 weight_decay=self.cfg.weight_decay, foreach=not (mixed or fused), fused=fused)

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
            state = {"optimizers": optimizers, "rng": torch.get_rng_state(), "nonfinite": int(self.nonfinite),
                     "last_logs": self.logged(), "train_seconds": self.clock(), "lr_end": self.lr_end}
            save_checkpoint(self.outdir / "checkpoints", self.step, weights, state, self.cfg.keep_checkpoints)
        parallel.barrier()

    def _newest_good(self) -> str:
        saved = list_checkpoints(self.outdir / "checkpoints")
        return f"the newest good checkpoint is {saved[-1]}" if saved else "the run has no checkpoint yet"

    def restore(self) -> bool:
        """Load the newest intact checkpoint (resume.newest_checkpoint), if any; True when the run resumes."""
        found = newest_checkpoint(self.outdir)
        if found is None:
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
        self.clock.start(float(state.get("train_seconds", 0.0)))  # train.max_minutes counts the seconds before too
        self.step = step
        self.nonfinite.fill_(int(state["nonfinite"]))
        self.last_logs = dict(state.get("last_logs", {}))
        self.lr_end = int(state.get("lr_end", 0))
        return True

    # ---- one iteration ---------------------------------------------------------------------------------------
    def noise(self, phase: int, micro: int):
        """Where phase `phase`'s micro-batch `micro` draws its noise (train.noise)."""
        if self.cfg.noise == "host":
            return nullcontext()
        return parallel.keyed_noise(self.accelerator.device, self.cfg.seed, self.step, phase, micro)

    def budget_decay(self) -> bool:
        """train.lr_decay_end=budget applies: a decay under train.max_minutes (a resume may drop the budget, and with
        it the planned end)."""
        c = self.cfg
        return bool(c.max_minutes and c.lr_decay != "none" and c.lr_decay_end == "budget")

    def _lr_scale(self) -> float:
        """train.warmup's linear ramp, then train.lr_decay from 1 at the end of the warm-up to 0 at train.iterations
        (or at self.lr_end, the budget's expected end under train.lr_decay_end=budget, when that comes first)."""
        c = self.cfg
        if c.warmup > 0 and self.step < c.warmup:
            return (self.step + 1) / c.warmup
        if c.lr_decay == "none":
            return 1.0
        end = min(c.iterations, self.lr_end) if self.budget_decay() and self.lr_end else c.iterations
        done = min((self.step - c.warmup) / max(end - c.warmup, 1), 1.0)
        return 1.0 - done if c.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))

    def train_step(self) -> dict[str, torch.Tensor | float]:
        """One iteration: each phase's loss over the micro-batches, its gradients clipped, one update. The logged
        values stay tensors (Trainer.logged reads them at log steps) and a non-finite loss or gradient is one flag
        per phase: with fused AdamW (self.host_free) no value is read back to the host at all."""
        micro = self.built.micro_batches(self.cfg.batch_size, self.cfg.grad_accum)
        logs: dict = {}
        samples: list = [None] * len(micro)  # each micro-batch's samples, handed from phase to phase
        for i, phase in enumerate(self.objective.phases(self.step)):
            names = phase.networks
            for name in names:
                for group in self.optimizers[name].param_groups:
                    group.setdefault("base_lr", group["lr"])
                    group["lr"] = group["base_lr"] * self._lr_scale()
            finite = torch.ones((), dtype=torch.bool, device=self.accelerator.device)
            for j, batch in enumerate(micro):  # gradients of the mean loss over the micro-batches
                # no weight-cast cache: torch before pytorch#165068 reused casts made under no_grad (a few-step
                # generator's backward simulation) in the graded pass, and those weights got no gradient
                with torch.autocast(self.accelerator.device.type, torch.bfloat16,
                                    enabled=self.cfg.precision == "bf16", cache_enabled=False), self.noise(i, j):
                    out = phase.loss(batch, samples[j])
                samples[j] = out.samples if out.samples is not None else samples[j]
                for k, v in out.logs.items():  # summed in float64, as Python floats would be
                    v = v.detach().double() if torch.is_tensor(v) else v
                    logs[k] = (logs.get(k, 0.0) if j else 0.0) + v / len(micro)
                finite &= torch.isfinite(out.loss.detach())
                if j == len(micro) - 1:  # the last backward pass of the phase averages its gradients as it goes
                    for name in names:
                        if name in self.syncs:
                            self.syncs[name].arm()
                self.accelerator.backward(out.loss / len(micro))  # a non-finite loss's gradients are never applied
            max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
            for name in names:
                if name in self.syncs:  # several processes: wait for the average
                    agreed = self.syncs[name].finish()
                    self.disagreed += ~agreed  # a phase that ran differently on some process: raised at the log step
                    finite &= agreed
                params = [p for p in self._parameters(name) if p.grad is not None]
                norm = parallel.clip_grad_norm(params, max_norm) if params else torch.zeros(())
                finite &= torch.isfinite(norm)
                logs[f"grad_norm/{name}"] = norm.detach()
            self._update(names, parallel.all_finite(finite))  # every process skips, or none does
            for n in self.objective.trains:  # a loss may reach other trained networks too: clear every grad
                for p in self._parameters(n):
                    p.grad = None
        logs["nonfinite"] = self.nonfinite  # live: the count as of the log step that reads it
        return logs

    def _update(self, names: list[str], finite: torch.Tensor) -> None:
        """The phase's optimizer steps and the EMA's update where `finite` holds; a non-finite loss or gradient never
        reaches the weights, the optimizer's moments or the EMA, and is counted in self.nonfinite. Fused AdamW takes
        the flag inside its kernel (found_inf, as torch's GradScaler passes it), so a GPU never waits for the host
        here; elsewhere the flag is read once (on the CPU every operation has already run: nothing to wait for)."""
        if self.host_free:
            skipped = (~finite).float()
            for name in names:
                self.optimizers[name].found_inf = skipped
                self.optimizers[name].step()
            if "generator" in names and self.ema is not None:
                self.ema.update(self.nets.generator, where=finite)
            self.nonfinite += ~finite
            return
        if bool(finite):
            for name in names:
                self.optimizers[name].step()
            if "generator" in names and self.ema is not None:
                self.ema.update(self.nets.generator)
            return
        self.nonfinite += 1
        self.check_nonfinite(names)

    def check_nonfinite(self, names: list[str] | None = None) -> None:
        """Stop the run once more than train.max_nonfinite phases were skipped, or once any phase's gradients differed
        between processes (host reads: the loop calls this at its log steps, train_step after each skip when it
        reads the flag anyway)."""
        if int(self.disagreed):
            raise RuntimeError(f"{int(self.disagreed)} phases, by iteration {self.step}, left gradients for different "
                               "parameters on different processes (their updates were skipped): a phase ran "
                               "differently on some process")
        count = int(self.nonfinite)
        if count > self.cfg.max_nonfinite:
            where = f"last at iteration {self.step} ({'+'.join(names)})" if names else f"by iteration {self.step}"
            raise NonFiniteError(
                f"{count} phases had a non-finite loss or gradient (limit train.max_nonfinite="
                f"{self.cfg.max_nonfinite}); {where}; {self._newest_good()}. Try a lower train.lr, "
                "train.precision=fp32, or a smaller train.grad_clip.")

    def logged(self) -> dict[str, float]:
        """The latest value of every logged quantity as numbers (reads the tensors back: log steps, checkpoints)."""
        return {k: float(v) for k, v in self.last_logs.items()}

    def teacher_score_matching(self) -> None:
        """MSD's first stage for a smaller student: generator.tsm_iterations of TSM (train/tsm.py) on real samples of
        this run's classes; the fake score, when the objective has one, then starts from the pretrained student."""
        from .tsm import teacher_score_matching

        data = self.built.data if self.built.data is not None else real_data(self.recipe, self.built.teacher,
                                                                             "generator.tsm_iterations")
        loss = teacher_score_matching(self.nets.generator.net, self.nets.teacher, data, self.built.sample_cond,
                                      self.cfg.lr, self.recipe.generator.tsm_iterations, self.cfg.batch_size,
                                      self.quiet)
        self.last_logs["loss/tsm"] = loss
        if self.nets.fake_score is not None:
            self.nets.fake_score.load_state_dict(self.nets.generator.net.state_dict())

    # ---- the student, for the loop's sample grids, curve points and evaluation ------------------------------------
    def student(self) -> Generator:
        return self.ema.model if self.ema is not None else self.nets.generator

    def scoring_teacher(self):
        """The teacher the final evaluation scores and decodes with: the run's own, or under train.teacher_dtype=bf16 a
        fresh fp32 one from its files, so the run's ratio divides by the same teacher score as every other run's and
        as `stepdistill eval --run`'s (the bf16 teacher scores differently: 2.125 against 2.146 on fashion-t2i)."""
        if self.execution["teacher"].get("dtype") != "bf16":  # configure_networks' report: cast or not
            return self.built.teacher
        from ..teachers import build_teacher

        return build_teacher(self.recipe.teacher).to(self.accelerator.device)

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

        with self.clock.excluded():
            with self.gathered():
                score = curve_score(self.recipe.eval, self.built.teacher, self.student(), self.classes)
            if parallel.is_main():
                loop.append_jsonl(path, {"step": self.step, "time": round(train_seconds, 3), **score})
            self.accelerator.log({f"curve/{k}": v for k, v in score.items()}, step=self.step)

    def run(self) -> dict | None:
        """Train (or resume) to train.iterations, holding the run folder (state.run_lock) throughout (train/loop.py)."""
        return loop.run(self)
