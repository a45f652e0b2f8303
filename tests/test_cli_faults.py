"""Faults of real `stepdistill` processes: kill -9, SIGTERM and SIGINT at random points of `train` (also inside
checkpoint writes), two commands on one run folder, and bad inputs answered with one line and exit status 2.

The training processes run a small driver that slows each iteration down (so a signal lands mid-run) and can kill
itself with SIGKILL at a chosen point of a checkpoint write; everything else is the real command line."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stepdistill.cli import main
from stepdistill.training.state import load_latest

TRAIN = ["configs/toy/gmm_vsd.yaml", "teacher.hidden=32", "train.batch_size=64", "train.iterations=20",
         "train.checkpoint_every=5", "train.log_every=1", "train.ema=0.9", "eval.at_end=false"]

DRIVER = """
import os, signal, sys, time
from pathlib import Path
from stepdistill.cli import main
from stepdistill.training import state
from stepdistill.training.trainer import Trainer

step = Trainer.train_step
def slow(self):
    time.sleep(float(os.environ.get("FAULT_SLEEP", "0")))
    return step(self)
Trainer.train_step = slow

# FAULT_KILL="write:STEP": after the files of checkpoint STEP, before its manifest; "rename:STEP": re-saving STEP, after
# its old copy was moved aside, before the new one is renamed in
where = os.environ.get("FAULT_KILL", "")
sha, rename = state.file_sha256, Path.rename
def die(kind, name):
    if where == f"{kind}:{int(name.rsplit('_', 1)[1])}":
        os.kill(os.getpid(), signal.SIGKILL)
def killing_sha(path):
    die("write", Path(path).parent.name)
    return sha(path)
def killing_rename(self, target):
    if self.name.startswith(".tmp_step_") and (self.parent / self.name.replace(".tmp_", ".old_")).exists():
        die("rename", self.name)
    return rename(self, target)
state.file_sha256, Path.rename = killing_sha, killing_rename
sys.exit(main(sys.argv[1:]))
"""


def _start(tmp_path, outdir, *extra, sleep=0.0, kill="", quiet=True):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, FAULT_SLEEP=str(sleep), FAULT_KILL=kill, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(driver), "train", *TRAIN, *extra, "--outdir", str(outdir)]
                            + ["--quiet"] * quiet,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def _wait_for_lines(path: Path, n: int, proc, timeout=60):
    """Wait until the run has logged n iterations (the loop is running)."""
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, _finish(proc)[1]
        time.sleep(0.01)
    raise AssertionError(f"{path} never reached {n} lines")


def _same_run(a: Path, b: Path):
    (sa, wa, ra), (sb, wb, rb) = load_latest(a / "checkpoints"), load_latest(b / "checkpoints")
    assert sa == sb == 20
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and wa.keys() == wb.keys()
    assert torch.equal(ra["rng"], rb["rng"])
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "time"}  # noqa: E731
                       for x in p.read_text().splitlines()]
    assert strip(a / "stats.jsonl") == strip(b / "stats.jsonl")


def test_signals_and_kills_at_random_points_each_resume_bitwise(tmp_path):
    """One run folder through SIGINT, SIGTERM and kill -9 at random iterations, kill -9 inside a checkpoint write
    and inside the final re-save of the last step; after each the same command resumes, and the finished run is
    bitwise the uninterrupted one (weights, random state, stats.jsonl)."""
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    ref = _start(tmp_path, tmp_path / "ref")
    run = tmp_path / "run"
    stats = run / "stats.jsonl"
    done = 0
    for signum, expect in ((signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)):
        proc = _start(tmp_path, run, sleep=0.05)
        at = rng.randint(done + 1, done + 3)
        _wait_for_lines(stats, at, proc)
        proc.send_signal(signum)
        code, text = _finish(proc)
        assert code == expect, (seed, text)
        if signum != signal.SIGKILL:  # a message, and a checkpoint of the iteration it stopped at
            name = signal.Signals(signum).name
            stopped = int(text.split(f"{name} at iteration ")[1].split(":")[0])
            assert f"checkpoint saved in {run / 'checkpoints'}; rerun the same command to resume" in text, text
            assert f"stepdistill train: interrupted ({name})" in text
            assert load_latest(run / "checkpoints")[0] == stopped >= at, (seed, text)
        done = len(stats.read_text().splitlines())
    ckpts = run / "checkpoints"
    code, text = _finish(_start(tmp_path, run, kill="write:15"))  # inside a checkpoint write: files, no manifest
    assert code == -9, (seed, text)
    assert sorted(p.name for p in (ckpts / ".tmp_step_0000015").iterdir()) == ["state.pt", "weights.safetensors"]
    assert load_latest(ckpts)[0] == 10
    code, text = _finish(_start(tmp_path, run, kill="rename:20"))  # the final re-save of step 20, old copy aside
    assert code == -9, (seed, text)
    assert sorted(p.name for p in ckpts.glob("*step_0000020")) == [".old_step_0000020", ".tmp_step_0000020"]
    assert load_latest(ckpts)[0] == 20
    code, text = _finish(_start(tmp_path, run, quiet=False))
    assert code == 0 and "resumed from iteration 20" in text, text
    assert _finish(ref)[0] == 0
    _same_run(tmp_path / "ref", run)


def test_a_second_command_on_a_run_folder_is_refused_and_a_killed_holder_leaves_it_free(tmp_path):
    run = tmp_path / "run"
    first = _start(tmp_path, run, sleep=2.0)  # slow enough to still hold the folder when the second starts
    _wait_for_lines(run / "stats.jsonl", 1, first)
    code, text = _finish(_start(tmp_path, run, "train.lr=0.01"))
    assert code == 2, text
    assert f"stepdistill train: error: {run} is in use by another stepdistill command (pid {first.pid})" in text
    assert first.poll() is None  # the holder runs on, untouched
    first.send_signal(signal.SIGKILL)
    assert _finish(first)[0] == -9
    code, text = _finish(_start(tmp_path, run))  # the dead holder's lock is gone with it
    assert code == 0, text
    steps = [json.loads(line)["step"] for line in (run / "stats.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))
    assert "lr: 0.001" in (run / "recipe.yaml").read_text()


# ---- bad inputs: one line naming the problem, exit status 2, nothing outside the target touched ------------------
GMM = ["configs/toy/gmm_vsd.yaml", "teacher.hidden=32", "train.iterations=4", "train.checkpoint_every=2",
       "eval.at_end=false", "train.batch_size=64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *GMM, "--outdir", str(run), "--quiet"]) == 0
    return run


def _one_line_error(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_yaml_syntax_errors_name_the_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  name: gmm\ntrain: {steps: [1, 2\n")
    err = _one_line_error(capsys, "train", str(bad), "--outdir", str(tmp_path / "r"))
    assert f"{bad}, line 4, column 1: YAML syntax error" in err
    err = _one_line_error(capsys, "train", *GMM, "train.iterations=[1", "--outdir", str(tmp_path / "r"))
    assert "override 'train.iterations=[1': its value is not valid YAML" in err
    bad.write_bytes(b"teacher: \xff\xfe\n")
    err = _one_line_error(capsys, "train", str(bad), "--outdir", str(tmp_path / "r"))
    assert f"{bad} is not a UTF-8 text file" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override, message", [
    ("train.lr=.inf", "train.lr must be a finite number, got inf"),
    ("train.lr=1e38", "train.lr must be in (0, 1] (an Adam step moves each weight by about the rate), got 1e+38"),
])
def test_absurd_settings_are_refused_with_the_recipe(override, message, tmp_path, capsys):
    assert message in _one_line_error(capsys, "train", *GMM, override, "--outdir", str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_sample_counts_must_be_positive(trained, tmp_path, capsys):
    for flag in ("--n", "--batch-size"):
        err = _one_line_error(capsys, "sample", "--run", str(trained), flag, "0", "--out", str(tmp_path / "s.npy"))
        assert f"{flag} must be >= 1, got 0" in err
    assert not (tmp_path / "s.npy").exists()


def test_exports_never_touch_what_they_did_not_write(trained, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    export = ["export", "--run", str(trained), "--format", "safetensors", "--out"]
    assert "give a path ending in .safetensors" in _one_line_error(capsys, *export, str(notes))
    assert "is a directory" in _one_line_error(capsys, *export, str(tmp_path))
    theirs = tmp_path / "theirs.safetensors"
    theirs.write_bytes(b"not an export")
    assert "exists and is not a stepdistill export" in _one_line_error(capsys, *export, str(theirs))
    assert notes.read_text() == "mine" and theirs.read_bytes() == b"not an export"
    ours = tmp_path / "ours.safetensors"
    assert main([*export, str(ours)]) == 0 and main([*export, str(ours)]) == 0  # a previous export is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "ours.safetensors", "theirs.safetensors"]


def test_a_diffusers_export_leaves_a_users_sibling_folders_alone(tmp_path):
    from stepdistill.export.diffusers_folder import staged

    out = tmp_path / "X"
    (tmp_path / "X.tmp").mkdir()
    (tmp_path / "X.tmp" / "mine.txt").write_text("mine")
    for n in range(2):  # a new export, then one replacing it
        with staged(out) as tmp:
            (tmp / "stepdistill.json").write_text(str(n))
    with pytest.raises(RuntimeError, match="disk gone"):  # an export failing half-way leaves the previous one
        with staged(out) as tmp:
            (tmp / "stepdistill.json").write_text("half")
            raise RuntimeError("disk gone")
    assert (tmp_path / "X.tmp" / "mine.txt").read_text() == "mine" and (out / "stepdistill.json").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X", "X.tmp"]


def test_bench_report_must_be_a_markdown_file(tmp_path):
    from stepdistill.bench import run_bench

    for report in (tmp_path / "R.txt", tmp_path):
        with pytest.raises(ValueError, match="give a markdown file path ending in .md"):
            run_bench("configs/bench/gmm.yaml", tmp_path / "runs", report)
    assert not (tmp_path / "runs").exists()


def test_non_finite_weights_are_refused_by_sample_eval_and_export(trained, tmp_path, capsys):
    import shutil

    from stepdistill.training.state import save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _, weights, st = load_latest(run / "checkpoints")
    for ckpt in list((run / "checkpoints").glob("step_*")):  # every checkpoint's weights overwritten with NaN
        shutil.rmtree(ckpt)
        save_checkpoint(run / "checkpoints", int(ckpt.name[5:]), {k: v * float("nan") for k, v in weights.items()},
                        st)
    target = str(tmp_path / "e.safetensors")
    with pytest.warns(UserWarning, match="non-finite"):
        for args in (["sample", "--run", str(run), "--n", "4", "--out", str(tmp_path / "s.npy")],
                     ["eval", "--run", str(run)],
                     ["export", "--run", str(run), "--format", "safetensors", "--out", target]):
            err = _one_line_error(capsys, *args)
            assert "no intact checkpoint" in err and "damaged ones were skipped" in err, err
    assert not (tmp_path / "s.npy").exists() and not Path(target).exists()


def test_eval_prints_its_scores_when_the_run_folder_is_read_only(trained, capsys, monkeypatch):
    from stepdistill.eval import harness

    def read_only(outdir, metrics, name="metrics.json"):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(harness, "write_metrics", read_only)
    assert main(["eval", "--run", str(trained), "eval.n=256"]) == 0
    out, err = capsys.readouterr()
    assert "student / teacher" in out
    assert f"could not write {trained / 'metrics.json'} (Permission denied); the scores above are not saved" in err


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_text('{"_class_name": "NoSuchModel"}'), "_class_name 'NoSuchModel' is not a diffusers class"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "is not a UTF-8 text file"),
    (lambda p: p.write_text('{"_class_name": ["UNet2DModel"]}'), "_class_name ['UNet2DModel'] is not a diffusers"),
    (lambda p: p.write_text("[1, 2]"), "must hold a JSON object, got a list"),
])
def test_a_teacher_folder_with_a_garbage_config_is_named(damage, message, tiny_unet_folder, tmp_path, capsys):
    damage(tiny_unet_folder / "unet" / "config.json")
    err = _one_line_error(capsys, "train", "configs/fashion/vsd_1step.yaml", "teacher.name=diffusers",
                          f"teacher.path={tiny_unet_folder}", "--outdir", str(tmp_path / "r"))
    assert str(tiny_unet_folder / "unet" / "config.json") in err and message in err


def test_eval_n_too_small_for_the_fashion_fd_is_refused_before_training(tmp_path, capsys):
    err = _one_line_error(capsys, "train", "configs/fashion/vsd_1step.yaml", "eval.n=100", "--outdir",
                          str(tmp_path / "r"))
    assert "eval.n=100 is too few for the Fashion FD (a covariance of 128 classifier features): set eval.n to more " \
           "than 128" in err
    assert not (tmp_path / "r").exists()


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    """Simulated by writes that fail with ENOSPC: in a checkpoint (its size is named, the partial one removed) and in
    any other file the command writes (the file is named)."""
    import errno

    from stepdistill.training import loop, state

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r" / "stats.jsonl"))

    with monkeypatch.context() as m:
        m.setattr(state.torch, "save", full)
        err = _one_line_error(capsys, "train", *GMM, "--quiet", "--outdir", str(tmp_path / "r"))
        assert "no space left on the device of" in err and "a checkpoint needs about" in err
    assert not list((tmp_path / "r" / "checkpoints").iterdir())
    monkeypatch.setattr(loop, "append_jsonl", full)  # the loop's and the curve's log lines
    err = _one_line_error(capsys, "train", *GMM, "--quiet", "--outdir", str(tmp_path / "r"))
    assert f"cannot write {tmp_path / 'r' / 'stats.jsonl'}: No space left on device" in err
