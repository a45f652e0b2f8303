"""The watch: a run that drifts or collapses says so (train.watch_every, train.on_collapse).

Every `train.watch_every` iterations the student (its EMA when there is one) makes `train.watch_n` samples from fixed
noise and conditions, and they are compared with teacher samples drawn once at the start with a fixed seed: a gmm
teacher's exact samples, else its ODE at eval.teacher_nfe (the evaluation's teacher). Never the data an evaluation
scores on: what the watch selects (the best checkpoint) is chosen on teacher samples only. Both sides are flattened,
so one measure serves mixtures, pixels and latents alike:

- distance: the energy distance between the two sample sets divided by the teacher samples' mean pairwise distance
  E|Y - Y'| (scale-free: 0 for the same distribution, about 2 |shift| / E|Y - Y'| for a far-away cloud);
- spread: the student's per-dimension standard deviation (root mean square over dimensions) over the teacher's.

An alarm fires when the samples are not finite, when the spread falls below COLLAPSE of its value at the best check
(output nearly constant: one point, or black / blank images), or when the distance exceeds train.watch_ratio times the
best distance and the floor train.watch_floor (noise around a tiny best does not fire). It is named (non-finite,
collapse, black, blow-up, drift), written to stats.jsonl (watch/*) and on the progress bar, and then train.on_collapse
decides: warn (go on), rollback (reload the best check's weights, optimizers, EMA and objective state from
OUTDIR/checkpoints_best, every learning rate times train.rollback_lr_factor; the iteration count goes on), or stop (a
checkpoint, then CollapseError).

The watch's state lives in the logged values (Trainer.last_logs, saved with every checkpoint) and the learning-rate
cut in the optimizers' base_lr, so a resumed run continues exactly. Sampling runs under fork_rng with its own seeded
generators: training with the watch on draws the same numbers as with it off, until an alarm changes the weights.
"""
from __future__ import annotations

import math
import warnings

import torch
from tqdm import tqdm

from .. import parallel
from ..errors import InputError, NonFiniteError
from ..models.lora import load_saved_state
from .state import load_latest, save_checkpoint, unprefixed

SEED = 20_250_601  # noise of the reference and of the student's watch samples: a stream of their own
COLLAPSE = 0.1  # spread below this share of the best check's: the output collapsed to (nearly) one sample
BLOWN_UP = 3.0  # a distance alarm with the spread above this many times the teacher's is named a blow-up
BEST = "checkpoints_best"


class CollapseError(NonFiniteError):
    """The watch raised an alarm and train.on_collapse is stop, or train.max_rollbacks rollbacks did not help: a
    diverged run, reported like NonFiniteError (the command line prints its message and exits with 2)."""


def _pairwise_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.cdist(a, b).mean())


class Reference:
    """The teacher's samples, flattened in float64, with the statistics every check compares against."""

    def __init__(self, samples: torch.Tensor, image: bool) -> None:
        self.y = samples.double().flatten(1)
        self.scale = _pairwise_mean(self.y, self.y)  # E|Y - Y'|
        self.spread = float(self.y.var(0).mean().sqrt())
        self.mean = self.y.mean(0)
        low, high = torch.quantile(self.y.flatten()[:1_000_000].float(), torch.tensor([0.05, 0.95])).tolist()
        self.black = low + 0.05 * (high - low)  # values at or below this are black (of images)
        self.image = image
        if not (self.scale > 0 and self.spread > 0):
            raise InputError("the watch's teacher samples are all equal: nothing to compare a student against")

    def compare(self, x: torch.Tensor) -> dict[str, float]:
        """{distance, spread, finite, low}: the student's samples x against the reference (see the module)."""
        x = x.double().flatten(1)
        if not bool(torch.isfinite(x).all()):
            return {"distance": math.inf, "spread": math.nan, "finite": 0.0}
        ed = 2 * _pairwise_mean(x, self.y) - _pairwise_mean(x, x) - self.scale
        return {"distance": max(ed, 0.0) / self.scale, "spread": float(x.var(0).mean().sqrt()) / self.spread,
                "finite": 1.0, "mean": x.mean(0),
                "black": float((x <= self.black).double().mean()) if self.image else 0.0}


def reference_samples(teacher, n: int, batch_size: int, nfe: int, guidance_scale: float,
                      classes: list[int] | None) -> torch.Tensor:
    """n teacher samples with the conditions the student's watch samples get (teacher.eval_cond), seeded by SEED."""
    from ..eval.harness import generate_teacher

    if hasattr(teacher, "sample"):  # a teacher that draws exact samples (gmm): no ODE error in the reference
        return teacher.sample(n, torch.Generator().manual_seed(SEED), teacher.eval_cond(n, classes)).cpu()
    # at the evaluation's NFE: a coarse ODE's samples are no teacher's (Fashion-MNIST at 9 NFE: pixels from -2.9 to 4.2)
    return generate_teacher(teacher, n, SEED, batch_size, nfe, guidance_scale, shard=True, classes=classes)[0]


class Watch:
    """Checks the trainer's student; `check` runs every train.watch_every iterations (every process calls it)."""

    def __init__(self, trainer) -> None:
        self.t, self.cfg = trainer, trainer.cfg
        e = trainer.recipe.eval
        with trainer.clock.excluded():  # not charged to train.max_minutes, like curve points
            with trainer.gathered(), torch.random.fork_rng(devices=[]):
                samples = reference_samples(trainer.built.teacher, self.cfg.watch_n, e.batch_size, e.teacher_nfe,
                                            e.guidance_scale, trainer.classes)
            self.ref = parallel.on_main(lambda: Reference(samples, trainer.built.teacher.is_image))
        self.alarm: str | None = None  # the last check's alarm, for the progress bar

    # the watch's state is its logged values (saved with each checkpoint as Trainer.last_logs)
    def _get(self, key: str, default: float) -> float:
        return float(self.t.last_logs.get(f"watch/{key}", default))

    def _set(self, **values: float) -> None:
        self.t.last_logs.update({f"watch/{k}": float(v) for k, v in values.items()})

    def samples(self) -> torch.Tensor:
        from ..eval.harness import generate_student

        student, teacher = self.t.student(), self.t.built.teacher
        was_training = student.training
        student.eval()
        with torch.random.fork_rng(devices=[]):
            xs = generate_student(student, teacher, self.cfg.watch_n, SEED, self.t.recipe.eval.batch_size,
                                  classes=self.t.classes, shard=True)
        student.train(was_training)
        return xs

    def check(self) -> str | None:
        """Sample, compare, log; on an alarm say so and act as train.on_collapse says. Returns the alarm's name."""
        with self.t.clock.excluded():  # like curve points, the watch's time is not charged to the budget
            return self._check()

    def _check(self) -> str | None:
        with self.t.gathered():
            xs = self.samples()
        s = parallel.on_main(lambda: self.ref.compare(xs))
        best, best_spread = self._get("best", math.inf), self._get("best_spread", 0.0)
        seen = math.isfinite(best)
        kind = None
        if not s["finite"]:
            kind = "non-finite"
        elif seen and s["spread"] < COLLAPSE * best_spread:
            kind = "black" if s["black"] > 0.9 else "collapse"
        elif seen and s["distance"] > max(self.cfg.watch_ratio * best, self.cfg.watch_floor):
            kind = "blow-up" if s["spread"] > BLOWN_UP else "drift"
        self.alarm = kind
        self._set(distance=s["distance"] if s["finite"] else -1.0, spread=s["spread"] if s["finite"] else -1.0,
                  alarm=kind is not None, alarms=self._get("alarms", 0) + (kind is not None),
                  rollbacks=self._get("rollbacks", 0))
        if kind is None and s["distance"] < best:
            self._set(best=s["distance"], best_step=self.t.step, best_spread=s["spread"])
            if self.cfg.on_collapse != "warn" or self.cfg.select == "best":  # what a rollback or select returns to
                self._save_best()
        elif kind is not None:
            self._act(kind, s)
        return kind

    def _describe(self, kind: str, s: dict) -> str:
        what = {"non-finite": "samples are not finite", "collapse": "output collapsed to nearly one sample",
                "black": "images collapsed to black", "blow-up": "samples blown up",
                "drift": "samples drifted away from the teacher's"}[kind]
        text = f"watch: {what} at iteration {self.t.step}"
        if s["finite"]:
            text += (f": distance {s['distance']:.3g} (best {self._get('best', math.inf):.3g} at iteration "
                     f"{int(self._get('best_step', 0))}), spread {s['spread']:.3g}x the teacher's")
            if len(self.ref.mean) <= 4:
                fmt = lambda v: "(" + ", ".join(f"{float(a):.3g}" for a in v) + ")"  # noqa: E731
                text += f", mean {fmt(s['mean'])} against the teacher's {fmt(self.ref.mean)}"
        return text

    def _act(self, kind: str, s: dict) -> None:
        text, mode = self._describe(kind, s), self.cfg.on_collapse
        rollbacks = int(self._get("rollbacks", 0))
        best_dir = self.t.outdir / BEST
        if mode == "rollback" and rollbacks >= self.cfg.max_rollbacks:
            mode, why = "stop", f"; {rollbacks} rollbacks (train.max_rollbacks) did not keep the run healthy"
        elif mode == "rollback" and not list(best_dir.glob("step_*")):
            mode, why = "stop", f"; no best checkpoint in {best_dir} to roll back to"
        else:
            why = ""
        if mode == "warn":
            self._say(text + " (train.on_collapse=warn: training goes on)")
        elif mode == "rollback":
            step = self._rollback(rollbacks + 1)
            lr = self.t.optimizers["generator"].param_groups[0]["base_lr"] if "generator" in self.t.optimizers \
                else None
            self._say(text + f"; rolled back to the best checkpoint (iteration {step}) with every learning rate "
                      f"x{self.cfg.rollback_lr_factor}" + (f" (generator now {lr:.3g})" if lr is not None else "")
                      + f"; the iteration count goes on from {self.t.step} (rollback {rollbacks + 1} of at most "
                      f"{self.cfg.max_rollbacks})")
        else:
            self.t.save()  # the state the alarm saw, for a look; the best one is in checkpoints_best
            best = f"; the best student by the watch (iteration {int(self._get('best_step', 0))}) is in {best_dir}" \
                if list(best_dir.glob("step_*")) else ""
            raise CollapseError(text + why + f". Stopped (train.on_collapse={self.cfg.on_collapse}) with a checkpoint "
                                f"in {self.t.outdir / 'checkpoints'}{best}. Try a lower train.lr"
                                + (", train.on_collapse=rollback" if self.cfg.on_collapse != "rollback" else "")
                                + " or another objective setting.")

    def _say(self, text: str) -> None:
        if not self.t.quiet:
            tqdm.write(text)

    def _save_best(self) -> None:
        """The full training state at this check into OUTDIR/checkpoints_best (one kept), as Trainer.save writes it."""
        t = self.t
        weights, optimizers = parallel.full((t._weights(), {k: o.state_dict() for k, o in t.optimizers.items()}))
        if parallel.is_main():
            save_checkpoint(t.outdir / BEST, t.step, weights, {"optimizers": optimizers}, keep=1)
        parallel.barrier()

    def _load(self, weights: dict, names) -> None:
        """These trained networks' weights, and the EMA's, from a checkpoint's weights."""
        t = self.t
        for name in names:
            load_saved_state(t.nets.get(name), parallel.sharded_state(t.nets.get(name), unprefixed(name, weights)))
        if t.ema is not None:
            load_saved_state(t.ema.model, parallel.sharded_state(t.ema.model, unprefixed("ema", weights)))

    def _rollback(self, count: int) -> int:
        """Load the best checkpoint's networks, optimizers, EMA and objective state (as Trainer.restore does; the
        step, random stream and counters go on) and set every learning rate to its recipe value times
        rollback_lr_factor ** count. Returns the best checkpoint's iteration."""
        t = self.t
        found = load_latest(t.outdir / BEST)
        if found is None:
            raise CollapseError(f"watch: the best checkpoint in {t.outdir / BEST} is damaged (see the warning): "
                                "nothing to roll back to")
        step, weights, state = found
        self._load(weights, t.objective.trains)
        for name in t.objective.trains:
            optimizer = t.optimizers[name]
            optimizer.load_state_dict(parallel.sharded_optimizer_state(optimizer, state["optimizers"][name]))
            lr = t.cfg.lr if name == "generator" else (t.cfg.fake_lr or t.cfg.lr)  # as Trainer._optimizer
            for group in optimizer.param_groups:
                group["base_lr"] = lr * self.cfg.rollback_lr_factor ** count
        t.objective.load_state_dict(unprefixed("objective", weights))
        self._set(rollbacks=count, distance=self._get("best", math.inf), spread=self._get("best_spread", 0.0))
        return step

    def select_best(self) -> int | None:
        """train.select=best, at the end of a run (after its last checkpoint is written, so resuming continues from
        the last iteration): the best check's generator and EMA weights replace the networks' for the final grid and
        evaluation. Returns that check's iteration (None, with a warning, when its checkpoint is damaged: the last
        iteration's student stays)."""
        t = self.t
        found = load_latest(t.outdir / BEST)
        if found is None:
            warnings.warn(f"train.select=best: no intact checkpoint in {t.outdir / BEST} (see the warning); the last "
                          f"iteration's student ({t.step}) is the run's", stacklevel=2)
            return None
        step, weights, _ = found
        self._load(weights, ["generator"])
        self._say(f"train.select=best: the run's student is iteration {step}'s, the watch's best check (distance "
                  f"{self._get('best', math.inf):.3g}; the last iteration's {self._get('distance', math.inf):.3g})")
        return step

    def postfix(self) -> dict[str, str]:
        """The progress bar's watch field: the last distance, or the alarm's name."""
        if self.alarm:
            return {"watch": self.alarm.upper()}
        d = self.t.last_logs.get("watch/distance")
        return {} if d is None else {"watch": f"{d:.3g}"}
