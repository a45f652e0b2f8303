"""The training loop behind Trainer.run: pre-loop stages in order, then iterations whose cadences are hooks, then the
end of the run (last checkpoint, sample grid, summary, final evaluation).

STAGES run once, in order, before the first iteration; each is a function of (trainer, run). After every iteration
the hooks run in the order `hooks` lists them; each is `every(n, fn)`: fn() after every n-th iteration. Between
iterations the loop stops on a signal (with a checkpoint, resumable) or when train.max_minutes is spent. The clock
(cadence.Clock) counts training seconds: curve points and the watch are not charged to train.max_minutes.
This module holds no networks: it drives a Trainer (train/trainer.py) through its public methods.
"""
from __future__ import annotations

import json
import signal
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import parallel
from .. import recipe as recipe_mod
from .cadence import Interrupted, every, stop_requests
from .resume import check_resumable, locked, truncate_stats


@dataclass
class Run:
    """What the stages set up for the loop and the end of one run() call (it lives no longer than that call)."""
    stats: Path
    curve: Path
    main: bool  # process 0: it writes the run's files
    resumed: bool = False
    curve_every: int = 0
    watch: object = None  # train/watch.py's Watch, when train.watch_every > 0
    bar: object = None
    first: int = 0  # the loop's first iteration and the clock then: the progress bar's rate
    loop_start: float = 0.0
    logs: dict = field(default_factory=dict)  # the last iteration's own logs (tensors: read at log steps)


# ---- stages, before the first iteration --------------------------------------------------------------------------
def dump_recipe(t, r: Run) -> None:
    """A rerun must use the recipe of the run it resumes (resume.check_resumable); the folder then holds this one."""
    check_resumable(t.outdir, t.recipe)
    parallel.barrier()  # every process has read the saved recipe before process 0 rewrites it
    if r.main:
        (t.outdir / "recipe.yaml").write_text(recipe_mod.dump(t.recipe))


def resume(t, r: Run) -> None:
    torch.manual_seed(t.cfg.seed)  # after building: only the loop's draws depend on this stream
    r.resumed = t.restore()  # a resumed clock goes on from its checkpoint's training seconds
    if not r.resumed:
        t.clock.start()  # train.max_minutes budgets the warm start too, not curve points


def warm_start(t, r: Run) -> None:
    """generator.tsm_iterations and generator.warm_start_iterations of a fresh run, then a checkpoint: a crash never
    redoes them."""
    g = t.recipe.generator
    keeps_pairs = t.objective.keeps_pairs  # vsd's regression term trains on them
    if r.resumed or not (g.tsm_iterations > 0 or g.warm_start_iterations > 0 or keeps_pairs):
        return
    if g.tsm_iterations > 0:
        t.teacher_score_matching()
    if g.warm_start_iterations > 0 or keeps_pairs:
        from .warm_start import regression_warm_start, teacher_pairs

        scale = type(t.objective).warm_start_guidance(t.recipe.objective)  # the objective says which teacher
        pairs = teacher_pairs(t.built.teacher, g.warm_start_pairs, g.warm_start_nfe, classes=t.classes,
                              guidance_scale=scale, generator=t.nets.generator, cache=g.warm_start_cache,
                              quiet=t.quiet or not parallel.is_main())
        if g.warm_start_iterations > 0:
            budgeted = t.cfg.max_minutes and g.warm_start_share
            seconds = g.warm_start_share * t.cfg.max_minutes * 60 - t.clock() if budgeted else None
            loss, done = regression_warm_start(
                t.nets.generator, pairs, g.warm_start_lr or t.cfg.lr, g.warm_start_iterations, t.cfg.batch_size,
                t.quiet, g.warm_start_decay, seconds)
            t.last_logs.update({"loss/warm_start": loss, "warm_start/iterations": done})
        if keeps_pairs:
            t.objective.pairs = pairs  # saved with every checkpoint (the objective's state): a resume keeps them
    if t.ema is not None:
        t.ema.model.load_state_dict(t.nets.generator.state_dict())
    t.broadcast()  # every process ran the same warm start: keep them bitwise equal all the same
    t.save()


def truncate_logs(t, r: Run) -> None:
    """stats.jsonl and curve.jsonl lose the lines past the resumed iteration (resume.truncate_stats)."""
    if not r.main:
        return
    for path in (r.stats, r.curve):
        dropped = truncate_stats(path, t.step)
        if dropped and not r.resumed:
            warnings.warn(f"{t.outdir} has no checkpoint to resume from, so the run starts over at iteration 0: "
                          f"{dropped} lines of an earlier run's {path.name} are dropped", stacklevel=2)


def first_checks(t, r: Run) -> None:
    """The watch's teacher samples and its first check, and the curve's first point, where they apply."""
    from .watch import Watch

    r.curve_every = t.recipe.eval.curve_every if t.built.teacher.domain != "none" else 0
    r.watch = Watch(t) if t.cfg.watch_every else None  # teacher samples to watch the student against
    if r.watch is not None and t.step == 0:  # (a warm start's checkpoint is at 0, before this check)
        r.watch.check()
    if r.curve_every and not r.resumed:
        t.curve_point(r.curve, t.clock())


def open_trackers(t, r: Run) -> None:
    """The trackers of train.log_with (written by process 0; TensorBoard's in OUTDIR/tb). A resumed run's TensorBoard
    events past its checkpoint are purged, as stats.jsonl is truncated, so its curves read like an uninterrupted
    run's."""
    if t.cfg.log_with:
        purge = {"purge_step": t.step + 1} if r.resumed else {}
        t.accelerator.init_trackers("tb", init_kwargs={"tensorboard": purge})


def open_logs(t, r: Run) -> None:
    """The progress bar and what the run says before its first iteration."""
    c = t.cfg
    r.bar = tqdm(total=c.iterations, initial=t.step, desc="distilling", unit="it", disable=t.quiet, dynamic_ncols=True)
    if parallel.world() > 1 and not t.quiet:
        tqdm.write(f"{parallel.world()} processes, {parallel.local_batch(c.batch_size)} of the "
                   f"train.batch_size={c.batch_size} samples each{t.sharding_note()}")
    if r.resumed and not t.quiet:
        tqdm.write(f"resumed from iteration {t.step} in {t.outdir / 'checkpoints'}")
    r.first, r.loop_start = t.step, t.clock()


STAGES = [dump_recipe, resume, warm_start, truncate_logs, open_trackers, first_checks, open_logs]


# ---- hooks, after every iteration --------------------------------------------------------------------------------
LR_PLAN = 50  # train.lr_decay_end=budget re-estimates the decay's end every LR_PLAN iterations


def hooks(t, r: Run) -> list[Callable[[int], None]]:
    c = t.cfg
    return [every(c.watch_every, lambda: r.watch.check()),  # before the log line and checkpoint: a rollback is in both
            every(1, lambda: progress(t, r)),
            every(LR_PLAN if t.budget_decay() else 0, lambda: plan_lr_end(t, r)),
            every(c.log_every, lambda: log(t, r), also=(c.iterations,)),  # the only host reads of an iteration
            every(c.checkpoint_every, lambda: t.save()),
            every(c.sample_every, lambda: sample_grid(t, f"step_{t.step:07d}")),
            every(r.curve_every, lambda: t.curve_point(r.curve, t.clock()))]


def expected_end(t, r: Run) -> int:
    """Where the run will end: at train.iterations, or where train.max_minutes runs out at the rate so far."""
    if not t.cfg.max_minutes:
        return t.cfg.iterations
    rate = (t.step - r.first) / max(t.clock() - r.loop_start, 1e-9)
    left = max(t.cfg.max_minutes * 60 - t.clock(), 0.0)
    return min(t.cfg.iterations, t.step + int(rate * left))


def progress(t, r: Run) -> None:
    r.bar.total = expected_end(t, r)
    r.bar.update(1)


def plan_lr_end(t, r: Run) -> None:
    """train.lr_decay_end=budget: the decay ends where the budget is expected to (every process the same end)."""
    if t.step - r.first >= LR_PLAN // 5:  # a rate over a few iterations after a resume is noise: keep the saved end
        t.lr_end = int(parallel.mean_values({"end": float(expected_end(t, r))})["end"])


def log(t, r: Run) -> None:
    """stats.jsonl's line, the trackers and the progress bar's losses; the non-finite limit is checked here."""
    t.check_nonfinite()
    r.bar.set_postfix({**{k.split("/")[-1]: f"{float(v):.3g}" for k, v in r.logs.items() if k.startswith("loss/")},
                       **(r.watch.postfix() if r.watch is not None else {})})
    values = parallel.mean_values(t.logged())  # each process logged its own rows' losses
    if r.main:
        append_jsonl(r.stats, {"step": t.step, "time": round(t.clock(), 3), **values})
    lrs = {f"lr/{name}": opt.param_groups[0]["lr"] for name, opt in t.optimizers.items()}
    t.accelerator.log({**values, **lrs}, step=t.step)


def sample_grid(t, tag: str) -> None:
    """samples/<tag>.png, and the same image to the trackers (TensorBoard's images tab, wandb's media)."""
    t.sample_grid(tag)
    if not (parallel.is_main() and t.accelerator.trackers):
        return
    import numpy as np
    from PIL import Image

    with Image.open(t.outdir / "samples" / f"{tag}.png") as img:
        image = np.asarray(img.convert("RGB"))
    for tracker in t.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", image, t.step, dataformats="HWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({"samples": [image]}, step=t.step)


def close_trackers(t) -> None:
    """Flush and close the trackers (not accelerator.end_training: it would also end the process group)."""
    for tracker in t.accelerator.trackers:
        tracker.finish()
    t.accelerator.trackers = []


# ---- the loop ----------------------------------------------------------------------------------------------------
def run(t) -> dict | None:
    """Train (or resume) trainer t to train.iterations, holding the run folder (state.run_lock) throughout; returns the
    final evaluation's metrics (None when there is none)."""
    with locked(t.outdir):
        r = Run(t.outdir / "stats.jsonl", t.outdir / "curve.jsonl", parallel.is_main())
        try:
            for stage in STAGES:
                stage(t, r)
            after = hooks(t, r)
            with stop_requests() as signalled:
                try:
                    while t.step < t.cfg.iterations:
                        r.logs = t.train_step()
                        t.step += 1
                        t.last_logs.update(r.logs)  # each value's latest reading: generator losses come every few
                        for hook in after:
                            hook(t.step)
                        if not parallel.all_true(not signalled[0]):  # a signal (on any process): stop, resumable
                            stop(t, r, signalled[0] or signal.SIGTERM)
                        if t.cfg.max_minutes and not parallel.all_true(t.clock() <= t.cfg.max_minutes * 60):
                            r.bar.total = t.step  # the budget may run out inside a checkpoint, after the estimate
                            r.bar.refresh()
                            if r.main:
                                tqdm.write(f"stopping at iteration {t.step}: train.max_minutes={t.cfg.max_minutes} "
                                           "reached")
                            break
                finally:
                    r.bar.close()
            return finish(t, r)
        finally:
            close_trackers(t)


def stop(t, r: Run, signum: int) -> None:
    """Stop on a signal with a checkpoint of this iteration (unless its hook just wrote one): raises Interrupted."""
    if not (t.cfg.checkpoint_every and t.step % t.cfg.checkpoint_every == 0):
        t.save()
    if r.main:
        tqdm.write(f"{signal.Signals(signum).name} at iteration {t.step}: checkpoint saved in "
                   f"{t.outdir / 'checkpoints'}; rerun the same command to resume")
    raise Interrupted(signum)


def finish(t, r: Run) -> dict | None:
    """The last checkpoint, curve point, sample grid and train_summary.json; then eval.at_end's evaluation (not for
    one MSD student: train/students.py evaluates the ensemble)."""
    from ..eval.harness import evaluate, write_metrics

    t.check_nonfinite()  # a run stopped by its budget or a signal between log steps, too
    select = r.watch is not None and t.cfg.select == "best"
    if select and t.step % t.cfg.watch_every:
        r.watch.check()  # the last iteration competes too (before the checkpoint, so its logs hold this check)
    t.save()
    selected = r.watch.select_best() if select else None
    if r.curve_every and t.step % r.curve_every:
        t.curve_point(r.curve, t.clock())
    values = parallel.mean_values(t.logged())
    sample_grid(t, "final")
    if r.main:
        summary = {"iterations": t.step, "train_seconds": round(t.clock(), 1),
                   **({"selected_iteration": selected} if selected is not None else {}), **values}
        (t.outdir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    parallel.barrier()  # the run's files are complete for every process once run() returns
    if not t.recipe.eval.at_end or t.classes is not None:
        return None
    with t.gathered():
        metrics = evaluate(t.recipe, t.scoring_teacher(), t.student(), quiet=t.quiet)
    if r.main:
        write_metrics(t.outdir, metrics)
    t.accelerator.log({f"eval/{k}": v for k, v in scalars(metrics).items()}, step=t.step)
    return metrics


def scalars(tree: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested dict (metrics.json's), keyed by path: student/fd, teacher/fd, ..."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
