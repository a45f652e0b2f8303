"""Resume exactness, damaged checkpoints, the non-finite guard, the wall-time budget."""
import json
import math
import re

import pytest
import torch
from conftest import HostReads, crash_at, same_newest_checkpoint

from stepdistill.objectives.base import LossOutput
from stepdistill.recipe import dump as recipe_mod_dump
from stepdistill.recipe import load_recipe
from stepdistill.training import trainer as trainer_mod
from stepdistill.training.state import list_checkpoints, load_latest
from stepdistill.training.trainer import NonFiniteError, Trainer

BASE = ["teacher.hidden=32", "train.batch_size=64", "train.iterations=20",
        "train.checkpoint_every=5", "train.log_every=1", "train.ema=0.9", "eval.at_end=false"]


def _recipe(*extra, path="configs/toy/gmm_vsd.yaml"):
    return load_recipe(path, BASE + list(extra))


def _stats(path):
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


@pytest.mark.parametrize("path, extra", [("configs/toy/gmm_vsd.yaml", ()), ("configs/toy/gmm_scm.yaml", ()),
                                         ("configs/toy/gmm_vsd.yaml", ("objective.regression_weight=0.5",
                                                                       "generator.warm_start_pairs=96")),
                                         ("configs/toy/gmm_vsd.yaml", ("train.noise=device",))],
                         ids=["vsd", "scm", "vsd-regression", "vsd-device-noise"])
def test_resume_after_a_crash_is_bitwise_identical(path, extra, tmp_path, monkeypatch):
    """Also for an objective that keeps state of its own (sCM's adaptive weight, the regression term's teacher ODE
    pairs: saved as objective.*)."""
    Trainer(_recipe(*extra, path=path), tmp_path / "a", quiet=True).run()

    original = crash_at(monkeypatch, 13)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(_recipe(*extra, path=path), tmp_path / "b", quiet=True).run()
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = Trainer(_recipe(*extra, path=path), tmp_path / "b", quiet=True)
    resumed.run()

    (_, wa, _), _ = same_newest_checkpoint(tmp_path / "a", tmp_path / "b")
    if "scm" in path:
        assert wa["objective.logvar.linear.weight"].abs().sum() > 0  # it trained (it starts at zero)
    if "objective.regression_weight=0.5" in extra:
        assert wa["objective.pairs.x0"].shape == (96, 2) and "loss/regression" in resumed.last_logs
    if "train.noise=device" in extra:  # the keyed draws are not the host stream's
        Trainer(_recipe("train.iterations=5", path=path), tmp_path / "host", quiet=True).run()
        assert _stats(tmp_path / "host" / "stats.jsonl")[-1] != _stats(tmp_path / "a" / "stats.jsonl")[4]
    assert _stats(tmp_path / "a" / "stats.jsonl") == _stats(tmp_path / "b" / "stats.jsonl")


def test_rerun_with_a_different_recipe_is_refused(tmp_path):
    Trainer(_recipe("train.iterations=5"), tmp_path / "r", quiet=True).run()
    with pytest.raises(ValueError, match=r"train\.lr"):
        Trainer(_recipe("train.iterations=5", "train.lr=0.5"), tmp_path / "r", quiet=True).run()
    Trainer(_recipe("train.iterations=6", "eval.n=300", "train.log_every=2"), tmp_path / "r",
            quiet=True).run()  # allowed


def test_a_run_with_no_checkpoint_does_not_hold_its_folder(tmp_path):
    """A run that stopped before its first checkpoint left nothing to resume: a corrected recipe may start there."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "recipe.yaml").write_text(recipe_mod_dump(_recipe("train.lr=0.5")))
    Trainer(_recipe("train.iterations=2"), tmp_path / "r", quiet=True).run()
    assert list_checkpoints(tmp_path / "r" / "checkpoints")


def test_damaged_checkpoint_is_detected_and_skipped(tmp_path):
    Trainer(_recipe("train.iterations=10"), tmp_path / "r", quiet=True).run()
    ckpts = list_checkpoints(tmp_path / "r" / "checkpoints")
    assert [c.name for c in ckpts] == ["step_0000005", "step_0000010"]
    weights = ckpts[-1] / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step_0000010"):
        step, _, _ = load_latest(tmp_path / "r" / "checkpoints")
    assert step == 5
    weights = ckpts[0] / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # every checkpoint damaged: refused, not a silent restart
    stats = (tmp_path / "r" / "stats.jsonl").read_text()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="all 2 checkpoints in .* are damaged"):
        Trainer(_recipe("train.iterations=10"), tmp_path / "r", quiet=True).run()
    assert (tmp_path / "r" / "stats.jsonl").read_text() == stats  # the log is untouched


def nan_generator_loss(trainer, monkeypatch) -> None:
    """The generator's loss becomes NaN (with a graph to the generator's weights)."""
    def nan_loss(batch, samples=None):
        p = next(trainer.nets.generator.parameters())
        return LossOutput(p.sum() * float("nan"), {})

    monkeypatch.setattr(trainer.objective, "generator_loss", nan_loss)


def test_non_finite_losses_never_reach_the_weights(tmp_path, monkeypatch):
    trainer = Trainer(_recipe("train.iterations=3", "train.max_nonfinite=2", "objective.update_ratio=1"),
                      tmp_path / "r", quiet=True)
    before = {k: v.clone() for k, v in trainer.nets.generator.state_dict().items()}

    nan_generator_loss(trainer, monkeypatch)
    with pytest.raises(NonFiniteError, match="3 phases had a non-finite loss"):
        trainer.run()
    after = trainer.nets.generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.nonfinite == 3


@pytest.mark.parametrize("path", ["configs/toy/gmm_vsd.yaml", "configs/toy/gmm_sid.yaml", "configs/toy/gmm_scm.yaml",
                                  "configs/toy/gmm_fdiv_js.yaml", "configs/toy/gmm_vsd_gan.yaml"])
def test_with_fused_adamw_an_iteration_reads_nothing_back_outside_log_steps(path, tmp_path, monkeypatch):
    """The loop of a GPU (trainer.HOST_FREE; the CPU is made one here): losses, gradient norms and the non-finite
    flag stay tensors between log steps, so no iteration but a log step makes the host wait."""
    from stepdistill.training import loop
    monkeypatch.setattr(trainer_mod, "HOST_FREE", ("cpu",))
    reads = {}
    for fn, mod in (("train_step", Trainer), ("progress", loop)):
        original = getattr(mod, fn)

        def counted(*args, original=original, fn=fn):
            with HostReads() as mode:
                out = original(*args)
            reads.setdefault(fn, []).extend(mode.reads)
            return out

        monkeypatch.setattr(mod, fn, counted)
    trainer = Trainer(_recipe("train.iterations=6", "train.log_every=3", path=path), tmp_path / "r", quiet=True)
    assert trainer.host_free
    trainer.run()
    assert reads == {"train_step": [], "progress": []}
    stats = _stats(tmp_path / "r" / "stats.jsonl")
    assert [s["step"] for s in stats] == [3, 6] and all(math.isfinite(v) for s in stats for v in s.values())


def test_with_fused_adamw_a_non_finite_phase_leaves_weights_moments_and_ema_as_they_were(tmp_path, monkeypatch):
    """The flag goes into fused AdamW's kernel (found_inf) and the EMA's weight: nothing moves, the phase is counted,
    and the run stops at the next log step once train.max_nonfinite is passed (the count is read there)."""
    monkeypatch.setattr(trainer_mod, "HOST_FREE", ("cpu",))
    trainer = Trainer(_recipe("train.iterations=6", "train.log_every=3", "train.max_nonfinite=1",
                              "objective.update_ratio=1"), tmp_path / "r", quiet=True)
    trainer.train_step()  # the optimizers' moments exist from here on
    trainer.step += 1
    gen = trainer.optimizers["generator"]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (trainer.nets.generator, trainer.ema.model)]
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in gen.state.items()}

    nan_generator_loss(trainer, monkeypatch)
    with pytest.raises(NonFiniteError, match="2 phases had a non-finite loss .* by iteration 3"):
        trainer.run()
    for was, m in zip(before, (trainer.nets.generator, trainer.ema.model)):
        assert all(torch.equal(was[k], v) for k, v in m.state_dict().items())
    assert all(torch.equal(moments[id(p)][k], v) for p, s in gen.state.items() for k, v in s.items())
    assert int(trainer.nonfinite) == 2 and trainer.step == 3  # iterations 2 and 3, stopped at the log step


def test_fused_adamw_trains_as_foreach_adamw_does_to_rounding(tmp_path, monkeypatch):
    weights = []
    for devices in ((), ("cpu",)):
        monkeypatch.setattr(trainer_mod, "HOST_FREE", devices)
        trainer = Trainer(_recipe("train.iterations=10"), tmp_path / str(len(devices)), quiet=True)
        assert trainer.host_free == bool(devices)
        trainer.run()
        weights.append(trainer.ema.model.state_dict())
    for k, v in weights[0].items():
        torch.testing.assert_close(weights[1][k], v, rtol=1e-4, atol=1e-5)


def test_a_checkpoint_resumes_with_the_resuming_runs_optimizer_kind(tmp_path, monkeypatch):
    """A foreach checkpoint (a CPU's, or one from before fused AdamW) resumes as fused where HOST_FREE says so, and a
    fused one (a GPU's) as foreach on the CPU: the saved param groups' `fused` does not carry over."""
    for first, then in (((), ("cpu",)), (("cpu",), ())):
        out = tmp_path / str(len(first))
        monkeypatch.setattr(trainer_mod, "HOST_FREE", first)
        Trainer(_recipe("train.iterations=5"), out, quiet=True).run()
        monkeypatch.setattr(trainer_mod, "HOST_FREE", then)
        resumed = Trainer(_recipe("train.iterations=7"), out, quiet=True)
        resumed.run()
        assert resumed.step == 7
        assert all(bool(g["fused"]) == bool(then) for o in resumed.optimizers.values() for g in o.param_groups)


def test_bf16_autocast_trains_with_finite_losses(tmp_path):
    trainer = Trainer(_recipe("train.iterations=4", "train.precision=bf16", "objective.update_ratio=1"), tmp_path / "r",
                      quiet=True)
    trainer.run()
    stats = _stats(tmp_path / "r" / "stats.jsonl")
    assert stats[-1]["nonfinite"] == 0 and stats[-1]["loss/generator"] == stats[-1]["loss/generator"]


def test_gradient_accumulation_gives_the_full_batch_gradient():
    """grad_accum micro-batches: the update uses the gradient of the whole batch's mean loss (a deterministic loss of
    the batch's labels, so both runs see the same rows)."""
    import torch.nn.functional as F

    from stepdistill.objectives.base import Phase

    grads = {}
    for k in (1, 4):
        trainer = Trainer(_recipe("teacher.conditional=true", f"train.grad_accum={k}"), "unused", quiet=True)
        gen = trainer.nets.generator

        def loss(batch, samples, gen=gen):
            x_in = F.one_hot(batch.cond.long(), 4)[:, :2].float() * 3 + 0.5
            x0 = gen.step(x_in, 0, batch.cond)
            return LossOutput((x0 ** 2).sum(1).mean(), {"loss/test": 0.0})

        trainer.objective.phases = lambda step, loss=loss: [Phase("generator", loss)]
        def keep(opt, *_, k=k):
            grads[k] = [p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None]

        trainer.optimizers["generator"].register_step_pre_hook(keep)
        torch.manual_seed(0)
        trainer.train_step()
    assert len(grads[1]) == len(grads[4]) > 0 and any(g.abs().sum() > 0 for g in grads[1])
    for a, b in zip(grads[1], grads[4]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_must_divide_the_batch():
    with pytest.raises(Exception, match=r"train.grad_accum=3 must be >= 1 and split train.batch_size=64"):
        Trainer(_recipe("train.grad_accum=3"), "unused", quiet=True)


def test_a_wall_time_budget_stops_the_run_and_ends_the_progress_bar_there(tmp_path, capfd):
    """train.max_minutes ends the run before train.iterations; the bar's total follows the budget, so its ETA is the
    budget's and it closes full, rather than counting towards a million iterations."""
    Trainer(_recipe("train.iterations=1000000", "train.max_minutes=0.02"), tmp_path / "r").run()
    out, err = capfd.readouterr()
    iterations = json.loads((tmp_path / "r" / "train_summary.json").read_text())["iterations"]
    assert 0 < iterations < 1000000
    assert f"stopping at iteration {iterations}: train.max_minutes=0.02 reached" in out
    done, total = re.findall(r"distilling: +\d+%\|[^|]*\| *(\d+)/(\d+)", err)[-1]
    assert int(done) == int(total) == iterations


def test_an_fp16_accelerate_config_does_not_scale_the_losses(tmp_path, monkeypatch):
    """`accelerate launch` exports the user's accelerate config; with fp16 on a GPU, accelerator.backward would scale
    every loss by a GradScaler that the trainer never unscales. Precision is train.precision, so accelerate's stays
    "no" whatever the environment says."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    AcceleratorState._reset_state()  # accelerate reads the environment when its process-wide state is first made
    try:
        trainer = Trainer(_recipe(), tmp_path, quiet=True)
        assert trainer.accelerator.mixed_precision == "no" and trainer.accelerator.scaler is None
    finally:
        AcceleratorState._reset_state()


def test_more_processes_than_gpus_is_an_error_naming_the_fixes(monkeypatch):
    """NCCL cannot put two processes on one GPU ("Duplicate GPU detected" at the first collective): say so before."""
    from stepdistill import parallel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"2 processes on this machine but 1 GPU\(s\): NCCL cannot share a GPU "
                                           r"between processes. Launch at most 1 per machine, or set "
                                           r"CUDA_VISIBLE_DEVICES='' to run them on the CPU"):
        parallel.compute_device()


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_lr_decay_runs_from_the_rate_after_warmup_to_zero_at_the_last_step(decay, tmp_path, monkeypatch):
    """train.lr_decay: the rate follows warm-up then the decay, read off the fake score's optimizer (updated at every
    iteration; the generator's rate is set the same way when its phase comes, every update_ratio-th iteration)."""
    seen = []
    original = Trainer.train_step

    def record(self):
        out = original(self)
        seen.append([g["lr"] / g["base_lr"] for g in self.optimizers["fake_score"].param_groups])
        return out

    monkeypatch.setattr(Trainer, "train_step", record)
    Trainer(_recipe("train.iterations=12", "train.warmup=2", f"train.lr_decay={decay}"), tmp_path, quiet=True).run()
    import math
    want = [0.5, 1.0] + [1 - i / 10 if decay == "linear" else 0.5 * (1 + math.cos(math.pi * i / 10)) for i in range(10)]
    assert len(seen) == 12
    for step, scales in enumerate(seen):
        assert all(s == pytest.approx(want[step]) for s in scales), (step, scales)


@pytest.mark.parametrize("end", ["iterations", "budget"])
def test_a_budgeted_decay_ends_where_the_budget_runs_out(end, tmp_path, monkeypatch):
    """train.lr_decay_end=budget under train.max_minutes: at each re-plan the cosine's end moves to where the budget
    runs out at the rate so far. A fake clock gives every iteration 1 s, so a 60 s budget ends the run after iteration
    60 of 100: from the first re-plan (iteration 10) the decay ends there; with `iterations` it heads for 100."""
    from types import SimpleNamespace

    from stepdistill.training import cadence, loop
    fake, seen = [0.0], []
    monkeypatch.setattr(cadence, "time", SimpleNamespace(time=lambda: fake[0]))
    monkeypatch.setattr(loop, "LR_PLAN", 10)
    original = Trainer.train_step

    def record(self):
        out = original(self)
        group = self.optimizers["fake_score"].param_groups[0]
        seen.append(group["lr"] / group["base_lr"])
        fake[0] += 1.0
        return out

    monkeypatch.setattr(Trainer, "train_step", record)
    keys = ["train.iterations=100", "train.lr_decay=cosine", f"train.lr_decay_end={end}", "train.checkpoint_every=0",
            "train.watch_every=0"]
    t = Trainer(_recipe(*keys, "train.max_minutes=1"), tmp_path, quiet=True)
    t.run()
    assert len(seen) == 61  # the budget is checked after each iteration: 61 s > 60 s stops the run
    ends = [100] * 10 + [60 if end == "budget" else 100] * 51
    for step, (scale, e) in enumerate(zip(seen, ends)):
        assert scale == pytest.approx(0.5 * (1 + math.cos(math.pi * min(step / e, 1.0))), abs=1e-9), (step, scale)
    assert t.lr_end == (60 if end == "budget" else 0)
    assert load_latest(tmp_path / "checkpoints")[2]["lr_end"] == t.lr_end  # a resume keeps the planned end
    seen.clear()  # resumed without a budget, the decay heads for train.iterations again
    Trainer(_recipe(*keys, "train.max_minutes=0"), tmp_path, quiet=True).run()
    assert len(seen) == 39 and seen[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 61 / 100)), abs=1e-9)


def test_extending_a_decaying_run_warns_that_its_schedule_moves(tmp_path, recwarn):
    """A constant rate extends silently (the run equals a longer one); a decaying rate cannot: the warning says so."""
    for decay in ("none", "cosine"):
        Trainer(_recipe("train.iterations=5", f"train.lr_decay={decay}"), tmp_path / decay, quiet=True).run()
    recwarn.clear()
    Trainer(_recipe("train.iterations=6", "train.lr_decay=none"), tmp_path / "none", quiet=True).run()
    assert not [w for w in recwarn if "lr_decay" in str(w.message)]
    with pytest.warns(UserWarning, match=r"train.iterations 5 -> 6 with train.lr_decay=cosine: from the resumed "
                                         r"iteration on, the learning rate decays towards iteration 6"):
        Trainer(_recipe("train.iterations=6", "train.lr_decay=cosine"), tmp_path / "cosine", quiet=True).run()


def test_a_resumed_run_goes_on_counting_its_training_seconds(tmp_path, monkeypatch):
    """The clock a checkpoint saves carries on after a crash, so train.max_minutes budgets the whole run and the
    logs' times and train_summary.json's seconds include the time before the crash."""
    import time

    original = Trainer.train_step

    def slow(self):
        time.sleep(0.02)
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", slow)
    crash_at(monkeypatch, 7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(_recipe("train.iterations=10"), tmp_path / "r", quiet=True).run()
    before = {s["step"]: s["time"] for s in map(json.loads, (tmp_path / "r" / "stats.jsonl").read_text().splitlines())}
    monkeypatch.setattr(Trainer, "train_step", slow)
    Trainer(_recipe("train.iterations=10"), tmp_path / "r", quiet=True).run()
    after = {s["step"]: s["time"] for s in map(json.loads, (tmp_path / "r" / "stats.jsonl").read_text().splitlines())}
    assert after[6] > before[5] >= 5 * 0.02  # the checkpoint at 5; step 6 was logged anew after the resume
    assert json.loads((tmp_path / "r" / "train_summary.json").read_text())["train_seconds"] >= 10 * 0.02


def _events(folder):
    """Every event of every TensorBoard file in `folder`, file by file in write order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [list(EventFileLoader(str(f)).Load()) for f in sorted(folder.glob("events.out.tfevents.*"))]


def test_trackers_get_losses_learning_rates_grids_and_a_resume_purges_past_its_checkpoint(tmp_path, monkeypatch):
    original = crash_at(monkeypatch, 13)
    logged = ("train.sample_every=10", "train.log_every=2", "eval.curve_every=10", "eval.curve_n=256")
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(_recipe(*logged), tmp_path / "run", quiet=True).run()
    monkeypatch.setattr(Trainer, "train_step", original)
    Trainer(_recipe(*logged), tmp_path / "run", quiet=True).run()
    first, second = _events(tmp_path / "run" / "tb")
    tags = {(v.tag, e.step) for e in first + second for v in e.summary.value}
    assert {("loss/generator", 2), ("lr/generator", 2), ("lr/fake_score", 2), ("samples", 10)} <= tags
    curve = {json.loads(line)["step"]: json.loads(line) for line in (tmp_path / "run" / "curve.jsonl").open()}
    assert ("curve/energy_distance", 10) in tags and set(curve) == {0, 10, 20}  # the evaluation curve, as curve.jsonl
    value = next(v.tensor.float_val[0] if v.tensor.float_val else v.simple_value for e in second
                 for v in e.summary.value if (v.tag, e.step) == ("curve/energy_distance", 20))
    assert value == pytest.approx(curve[20]["energy_distance"], rel=1e-5)
    assert ("samples", 20) in tags and ("loss/generator", 20) in tags
    # the crashed run logged 12; the rerun resumed from its checkpoint at 10 and purged every event from 11 on
    assert max(e.step for e in first if e.summary.value) == 12
    purge = [e for e in second if e.HasField("session_log")]
    assert purge and purge[0].step == 11 and purge[0].session_log.status == purge[0].session_log.START


def test_an_unavailable_tracker_is_named_before_training(tmp_path):
    from stepdistill.errors import RecipeError

    with pytest.raises(RecipeError, match="train.log_with: unknown tracker 'tensorbored'"):
        Trainer(_recipe("train.log_with=[tensorbored]"), tmp_path / "a", quiet=True)
    Trainer(_recipe("train.log_with=[]", "train.iterations=2"), tmp_path / "b", quiet=True).run()
    assert not (tmp_path / "b" / "tb").exists()
