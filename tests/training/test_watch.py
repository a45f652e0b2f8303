"""The watch (train/watch.py): a student that drifts or collapses is named in the log, then warned about, rolled back
or stopped; a healthy run trains bitwise as with the watch off; a resumed run continues exactly."""
import json
import shutil

import pytest
import torch
from conftest import crash_at, same_newest_checkpoint
from torch import nn

from stepdistill.recipe import RecipeError, load_recipe
from stepdistill.training.state import list_checkpoints, load_latest
from stepdistill.training.trainer import Trainer
from stepdistill.training.watch import BEST, CollapseError, Reference, Watch

BASE = ["teacher.hidden=32", "train.batch_size=64", "train.iterations=20", "train.checkpoint_every=5",
        "train.log_every=1", "train.ema=0.9", "eval.at_end=false", "train.watch_every=5", "train.watch_n=64"]


def _recipe(*extra, path="configs/toy/gmm_vsd.yaml"):
    return load_recipe(path, BASE + list(extra))


def _stats(path):
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


def _drift_at(monkeypatch, *iterations, shift=20.0):
    """After each of these iterations the generator's last layer is pushed by `shift`: its samples land far away."""
    original = Trainer.train_step

    def drifting(self):
        out = original(self)
        if self.step + 1 in iterations:
            with torch.no_grad():
                [m for m in self.nets.generator.modules() if isinstance(m, nn.Linear)][-1].bias += shift
        return out

    monkeypatch.setattr(Trainer, "train_step", drifting)


def test_a_healthy_run_trains_bitwise_as_with_the_watch_off(tmp_path):
    """The watch samples under fork_rng with its own seeds; saving the best state (rollback mode) changes nothing."""
    Trainer(_recipe("train.on_collapse=rollback"), tmp_path / "on", quiet=True).run()
    Trainer(_recipe("train.watch_every=0"), tmp_path / "off", quiet=True).run()
    same_newest_checkpoint(tmp_path / "on", tmp_path / "off")
    on, off = _stats(tmp_path / "on" / "stats.jsonl"), _stats(tmp_path / "off" / "stats.jsonl")
    assert [{k: v for k, v in r.items() if not k.startswith("watch/")} for r in on] == off
    assert all(r["watch/alarms"] == 0 and r["watch/distance"] > 0 for r in on)
    assert {r["watch/best_step"] for r in on} <= {0, 5, 10, 15, 20}
    assert [c.name for c in list_checkpoints(tmp_path / "on" / BEST)] == [f"step_{int(on[-1]['watch/best_step']):07d}"]
    assert not (tmp_path / "off" / BEST).exists()


def test_the_alarm_names_what_happened(tmp_path, monkeypatch):
    trainer = Trainer(_recipe("train.ema=0"), tmp_path, quiet=True)
    trainer.paused = 0.0
    watch = Watch(trainer)
    y = trainer.built.teacher.sample(64, torch.Generator().manual_seed(5))  # not the watch's own reference samples
    kinds = []
    for x in (y, y * 0 + 1, y + 30, y * 10, y * float("nan")):
        monkeypatch.setattr(watch, "samples", lambda x=x: x)
        kinds.append(watch.check())
    assert kinds == [None, "collapse", "drift", "blow-up", "non-finite"]
    assert trainer.last_logs["watch/alarms"] == 4 and trainer.last_logs["watch/best"] < 0.05
    assert watch.postfix() == {"watch": "NON-FINITE"}

    images = torch.rand(64, 1, 8, 8) * 2 - 1
    images[..., :4] = -1  # half of every image is black background
    watch.ref = Reference(images, image=True)
    monkeypatch.setattr(watch, "samples", lambda: torch.full((64, 1, 8, 8), -1.0))
    assert watch.check() == "black"


def test_a_drift_is_rolled_back_to_the_best_state_with_a_lower_learning_rate(tmp_path, monkeypatch, capfd):
    _drift_at(monkeypatch, 12)
    seen = {}
    original = Watch._rollback

    def rollback(self, count):
        step = original(self, count)
        _, best, _ = load_latest(self.t.outdir / BEST)
        seen.update(step=step, best=best, now={k: v.clone() for k, v in self.t._weights().items()},
                    lr={k: o.param_groups[0]["base_lr"] for k, o in self.t.optimizers.items()})
        return step

    monkeypatch.setattr(Watch, "_rollback", rollback)
    recipe = _recipe("train.ema=0", "train.on_collapse=rollback", "train.fake_lr=2e-3")
    Trainer(recipe, tmp_path).run()
    out = capfd.readouterr().out
    stats = {r["step"]: r for r in _stats(tmp_path / "stats.jsonl")}
    best = int(stats[14]["watch/best_step"])  # the collapsed start improves slowly: 5 or 10
    assert "watch: samples drifted away from the teacher's at iteration 15: distance " in out
    assert f"rolled back to the best checkpoint (iteration {best}) with every learning rate x0.5" in out
    assert seen["step"] == best and seen["best"].keys() == seen["now"].keys()
    for k in seen["best"]:
        assert torch.equal(seen["best"][k], seen["now"][k]), k
    assert seen["lr"] == {"generator": pytest.approx(recipe.train.lr / 2), "fake_score": pytest.approx(1e-3)}
    assert stats[15]["watch/alarm"] == 1 and stats[15]["watch/rollbacks"] == 1 and stats[15]["watch/best_step"] == best
    assert stats[20]["watch/alarm"] == 0 and stats[20]["watch/alarms"] == 1
    assert stats[20]["watch/distance"] < 1.5 * stats[15]["watch/best"]  # back near the best after the rollback


def test_stop_ends_the_run_with_an_error_and_a_checkpoint(tmp_path, monkeypatch):
    _drift_at(monkeypatch, 12)
    with pytest.raises(CollapseError, match=r"drifted away from the teacher's at iteration 15: distance .*mean \(.*\) "
                                            r"against the teacher's .*Stopped \(train.on_collapse=stop\) with a "
                                            r"checkpoint .*best student by the watch \(iteration \d+\)"):
        Trainer(_recipe("train.ema=0", "train.on_collapse=stop"), tmp_path, quiet=True).run()
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == "step_0000015"
    best = int(_stats(tmp_path / "stats.jsonl")[-1]["watch/best_step"])
    assert [c.name for c in list_checkpoints(tmp_path / BEST)] == [f"step_{best:07d}"]


def test_rollbacks_that_do_not_help_end_in_an_error(tmp_path, monkeypatch):
    _drift_at(monkeypatch, 12, 17)
    with pytest.raises(CollapseError, match=r"at iteration 20.*1 rollbacks \(train.max_rollbacks\) did not keep the "
                                            r"run healthy"):
        Trainer(_recipe("train.ema=0", "train.on_collapse=rollback", "train.max_rollbacks=1"), tmp_path,
                quiet=True).run()


def test_the_command_line_reports_a_stop_in_one_line(tmp_path, monkeypatch, capsys):
    from stepdistill.cli import main

    _drift_at(monkeypatch, 12)
    args = ["train", "configs/toy/gmm_vsd.yaml", *BASE, "train.ema=0", "train.on_collapse=stop", "--outdir",
            str(tmp_path), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "stepdistill train: error: watch: samples drifted away from the teacher's at iteration 15" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("crash", [13, 17])
def test_resume_after_a_crash_with_the_watch_on_is_bitwise_identical(crash, tmp_path, monkeypatch):
    """A crash before the rollback at 15 (resumed from 10: the drift and the rollback happen again) or after it
    (resumed from 15: the rollback count, the lower learning rate and the best distance come back)."""
    recipe = _recipe("train.on_collapse=rollback")  # with EMA: the watch watches (and a rollback restores) it
    _drift_at(monkeypatch, 12)
    Trainer(recipe, tmp_path / "a", quiet=True).run()
    drifting = crash_at(monkeypatch, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(recipe, tmp_path / "b", quiet=True).run()
    monkeypatch.setattr(Trainer, "train_step", drifting)
    resumed = Trainer(recipe, tmp_path / "b", quiet=True)
    resumed.run()
    assert resumed.optimizers["generator"].param_groups[0]["base_lr"] == pytest.approx(recipe.train.lr / 2)
    same_newest_checkpoint(tmp_path / "a", tmp_path / "b")
    a, b = _stats(tmp_path / "a" / "stats.jsonl"), _stats(tmp_path / "b" / "stats.jsonl")
    assert a == b and a[-1]["watch/rollbacks"] == 1


def test_select_best_makes_the_watchs_best_check_the_runs_student(tmp_path, monkeypatch, capfd):
    """train.select=best: the run ends off a watch iteration (18), so a last check sees the drift of iteration 16;
    the final grid, evaluation and every later command use the best check's weights, while the last checkpoint
    (what a resume continues from) stays the last iteration's."""
    from stepdistill.run import load_run

    _drift_at(monkeypatch, 16)
    trainer = Trainer(_recipe("train.ema=0", "train.select=best", "train.iterations=18"), tmp_path)
    trainer.run()
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    best = summary["selected_iteration"]
    assert best in (0, 5, 10, 15) and summary["watch/best_step"] == best and summary["watch/alarms"] == 1
    assert f"train.select=best: the run's student is iteration {best}'s" in capfd.readouterr().out
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == "step_0000018"
    (_, last, _), (_, kept, _) = load_latest(tmp_path / "checkpoints"), load_latest(tmp_path / BEST)
    run = load_run(tmp_path)
    assert run.step == best
    for k, v in run.student.state_dict().items():
        assert torch.equal(v, kept[f"generator.{k}"]) and torch.equal(v, trainer.student().state_dict()[k]), k
    assert any(not torch.equal(kept[k], last[k]) for k in kept if k.startswith("generator."))

    shutil.rmtree(tmp_path / BEST)  # a damaged or missing best: the last iteration's student, with a warning
    with pytest.warns(UserWarning, match="holds no intact checkpoint: loading the last iteration's student"):
        assert load_run(tmp_path).step == 18


def test_the_watch_keys_are_checked():
    with pytest.raises(RecipeError, match=r"train.on_collapse: 'bogus' is not allowed; choose one of 'warn', "
                                          r"'rollback', 'stop'"):
        _recipe("train.on_collapse=bogus")
    with pytest.raises(RecipeError, match=r"train.watch_ratio must be > 1 .*; train.rollback_lr_factor must be in "
                                          r"\(0, 1\], got 0.0"):
        _recipe("train.watch_ratio=1", "train.rollback_lr_factor=0")
    with pytest.raises(RecipeError, match=r"train.select=best picks the watch's best check, but train.watch_every=0"):
        _recipe("train.select=best", "train.watch_every=0")


def test_sid_diverging_on_ring8_is_caught(tmp_path):
    """The real case: one-step SiD with alpha 1.5 on the ring8 mixture blows up by iteration ~200 with every loss
    finite (docs/claims_gmm.md); the watch stops it with the distance far above its best."""
    overrides = [line for line in open("configs/toy/ring8/overrides.txt").read().splitlines()
                 if line and not line.startswith("#")]
    recipe = load_recipe("configs/toy/gmm_sid.yaml", overrides + ["objective.alpha=1.5", "train.iterations=200",
                                                                   "train.watch_every=20", "train.on_collapse=stop",
                                                                   "eval.at_end=false"])
    torch.set_num_threads(1)  # a small MLP: about 12 s on one thread, several times that on two busy ones
    with pytest.raises(CollapseError, match=r"(blown up|drifted away).* at iteration \d+: distance"):
        Trainer(recipe, tmp_path, quiet=True).run()
    stats = _stats(tmp_path / "stats.jsonl")
    assert stats[-1]["nonfinite"] == 0
