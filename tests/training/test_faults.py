"""Faults inside one process: signals mid-iteration, crashes inside checkpoint writes, a full disk, torn logs,
non-finite weights, forged manifests, a held run folder. Each resumed run is bitwise the uninterrupted one."""
import errno
import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from conftest import same_newest_checkpoint

from stepdistill.recipe import RecipeError, load_recipe
from stepdistill.training import state
from stepdistill.training.state import RunFolderError, list_checkpoints, load_latest, run_lock, save_checkpoint
from stepdistill.training.trainer import Interrupted, NonFiniteError, Trainer

BASE = ["teacher.hidden=32", "train.batch_size=64", "train.iterations=12", "train.checkpoint_every=5",
        "train.log_every=1", "train.ema=0.9", "eval.at_end=false"]


def _recipe(*extra):
    return load_recipe("configs/toy/gmm_vsd.yaml", BASE + list(extra))


def _stats(path):
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run to compare against."""
    out = tmp_path_factory.mktemp("reference") / "run"
    Trainer(_recipe(), out, quiet=True).run()
    return out


def assert_same_run(a: Path, b: Path):
    (sa, _, ra), (sb, _, rb) = same_newest_checkpoint(a, b)
    assert sa == sb
    assert torch.equal(ra["rng"], rb["rng"])
    assert _stats(a / "stats.jsonl") == _stats(b / "stats.jsonl")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_iteration_stops_after_it_and_resumes_bitwise(signum, reference, tmp_path, monkeypatch):
    """The signal arrives inside iteration 7's update (after its batch was drawn): the checkpoint holds the weights and
    random state of the end of iteration 7, never a mix of two iterations."""
    original = Trainer.train_step

    def signalled(self):
        logs = original(self)
        if self.step == 6:  # (self.step counts from 0: this is the 7th iteration)
            os.kill(os.getpid(), signum)
        return logs

    monkeypatch.setattr(Trainer, "train_step", signalled)
    with pytest.raises(Interrupted) as stop:
        Trainer(_recipe(), tmp_path, quiet=True).run()
    assert stop.value.signum == signum
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == ["step_0000005", "step_0000007"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    monkeypatch.setattr(Trainer, "train_step", original)
    Trainer(_recipe(), tmp_path, quiet=True).run()
    assert_same_run(reference, tmp_path)


def test_a_crash_inside_a_resave_keeps_the_old_copy(reference, tmp_path, monkeypatch):
    """Every run saves its last step twice (the periodic checkpoint, then the final one). A crash after the old copy
    was moved aside and before the new one is renamed in leaves the old copy, which the rerun resumes from (with
    keep_checkpoints=1 it is the only one): it neither restarts nor rewrites stats.jsonl."""
    Trainer(_recipe("train.iterations=10", "train.keep_checkpoints=1"), tmp_path, quiet=True).run()
    stats = (tmp_path / "stats.jsonl").read_text()
    rename = Path.rename

    def crash(self, target):
        if self.name.startswith(".tmp_step_"):
            raise OSError("simulated crash between the renames")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        Trainer(_recipe("train.iterations=10", "train.keep_checkpoints=1"), tmp_path, quiet=True).run()
    monkeypatch.setattr(Path, "rename", rename)
    assert not (tmp_path / "checkpoints" / "step_0000010").exists()
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == [".old_step_0000010"]
    assert load_latest(tmp_path / "checkpoints")[0] == 10
    Trainer(_recipe("train.iterations=10", "train.keep_checkpoints=1"), tmp_path, quiet=True).run()
    assert (tmp_path / "stats.jsonl").read_text() == stats
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000010"]
    Trainer(_recipe("train.keep_checkpoints=1"), tmp_path, quiet=True).run()  # and it continues to 12 exactly
    assert_same_run(reference, tmp_path)


def test_the_directory_is_synced_after_the_rename(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(state, "_fsync_dir", lambda folder: synced.append(folder))
    final = save_checkpoint(tmp_path, 3, {"w": torch.ones(2)}, {"rng": torch.get_rng_state()})
    assert synced == [tmp_path] and final.name == "step_0000003"


def test_a_full_disk_removes_the_partial_checkpoint_and_says_how_much_is_needed(tmp_path, monkeypatch):
    Trainer(_recipe("train.iterations=5"), tmp_path, quiet=True).run()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state.torch, "save", full)
    with pytest.raises(RunFolderError, match=r"no space left on the device of .*checkpoints: a checkpoint needs about "
                                             r"\d+\.\d MiB; free space and rerun the same command"):
        Trainer(_recipe("train.iterations=8"), tmp_path, quiet=True).run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000005"]  # no .tmp_step_*
    monkeypatch.undo()
    Trainer(_recipe("train.iterations=8"), tmp_path, quiet=True).run()  # space freed: it resumes from 5
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == ["step_0000005", "step_0000008"]


def test_a_torn_last_log_line_is_dropped_with_a_warning(reference, tmp_path):
    Trainer(_recipe("train.iterations=10"), tmp_path, quiet=True).run()
    with open(tmp_path / "stats.jsonl", "a") as f:
        f.write('{"step": 11, "loss/generator": 0.12')  # a write cut short
    with pytest.warns(UserWarning, match=r"stats\.jsonl: dropping its torn last line"):
        Trainer(_recipe(), tmp_path, quiet=True).run()
    assert_same_run(reference, tmp_path)
    lines = (tmp_path / "stats.jsonl").read_text().splitlines()
    (tmp_path / "stats.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"stats\.jsonl, line 2, is not a JSON record"):
        Trainer(_recipe(), tmp_path, quiet=True).run()


def test_a_run_whose_checkpoints_were_deleted_says_it_starts_over(tmp_path):
    Trainer(_recipe("train.iterations=5"), tmp_path, quiet=True).run()
    for c in list_checkpoints(tmp_path / "checkpoints"):
        for f in c.iterdir():
            f.unlink()
        c.rmdir()
    with pytest.warns(UserWarning, match="no checkpoint to resume from, so the run starts over at iteration 0: 5 "
                                         "lines of an earlier run's stats.jsonl are dropped"):
        Trainer(_recipe("train.iterations=5"), tmp_path, quiet=True).run()


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.fake_lr=.nan", "teacher.std=.inf",
                                      "teacher.means=[[0,.nan],[1,1]]", "train.betas=[.nan,0.9]"])
def test_non_finite_settings_are_refused(override):
    key = re.escape(override.split("=")[0])
    with pytest.raises(RecipeError, match=rf"{key}(\[\d\])* must be a finite number"):
        _recipe(override)


def test_non_finite_weights_are_never_saved_nor_loaded(tmp_path):
    trainer = Trainer(_recipe("train.iterations=5"), tmp_path, quiet=True)
    trainer.run()
    with torch.no_grad():
        next(trainer.nets.generator.parameters()).fill_(float("inf"))
    trainer.step = 6
    with pytest.raises(NonFiniteError, match=r"non-finite values at iteration 6 .*they were not saved; the newest "
                                             r"good checkpoint is .*step_0000005"):
        trainer.save()
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == ["step_0000005"]
    # a checkpoint written with non-finite weights anyway (an older version) is skipped like a damaged one
    weights = trainer._weights()
    save_checkpoint(tmp_path / "checkpoints", 6, weights, {"rng": torch.get_rng_state(), "nonfinite": 0})
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*step_0000006: 1 weight tensors hold "
                                         r"non-finite values \(e\.g\. generator\."):
        assert load_latest(tmp_path / "checkpoints")[0] == 5


def _forge(ckpt: Path, name: str, data: bytes | None = None):
    """Point the manifest at `name` (with that file's true hash), as someone editing it would."""
    from stepdistill.hashing import file_sha256

    manifest = json.loads((ckpt / "manifest.json").read_text())
    if data is not None:
        (ckpt / name).write_bytes(data)
    target = (ckpt / name) if not name.startswith("/") else Path(name)
    manifest["sha256"] = {n: d for n, d in manifest["sha256"].items() if n != "state.pt"}
    manifest["sha256"][name] = file_sha256(target) if target.is_file() else "0" * 64
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("forgery", ["absolute", "parent", "symlinked_file", "symlinked_folder", "bad_pickle"])
def test_a_forged_checkpoint_falls_back_to_the_older_one(forgery, tmp_path):
    Trainer(_recipe("train.iterations=10"), tmp_path / "run", quiet=True).run()
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000010"
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    if forgery == "absolute":
        _forge(ckpt, "/dev/zero")
    elif forgery == "parent":
        _forge(ckpt, "../../../outside.txt")
    elif forgery == "symlinked_file":
        (ckpt / "state.pt").unlink()
        (ckpt / "state.pt").symlink_to(outside)
        _forge(ckpt, "state.pt")
    elif forgery == "symlinked_folder":  # a checkpoint folder elsewhere, linked in
        os.rename(ckpt, tmp_path / "elsewhere")
        ckpt.symlink_to(tmp_path / "elsewhere")
    else:  # a state.pt that does not unpickle, with a matching hash
        _forge(ckpt, "state.pt", b"\x80\x02garbage")
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*step_0000010"):
        assert load_latest(tmp_path / "run" / "checkpoints")[0] == 5
    assert outside.read_text() == "not yours"


def test_a_checkpoint_folder_without_manifest_is_reported(tmp_path):
    Trainer(_recipe("train.iterations=5"), tmp_path, quiet=True).run()
    (tmp_path / "checkpoints" / "step_0000009").mkdir()
    with pytest.warns(UserWarning, match=r"skipping .*step_0000009: it has no manifest\.json"):
        assert load_latest(tmp_path / "checkpoints")[0] == 5


def test_a_held_run_folder_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunFolderError, match=rf"{tmp_path} is in use by another stepdistill command "
                                                 rf"\(pid {os.getpid()}\)"):
            Trainer(_recipe("train.iterations=2"), tmp_path, quiet=True).run()
    assert not list_checkpoints(tmp_path / "checkpoints")  # nothing was done
    (tmp_path / ".lock").write_text("999999\n")  # left by a process that died: the kernel's lock went with it
    Trainer(_recipe("train.iterations=2"), tmp_path, quiet=True).run()
    assert list_checkpoints(tmp_path / "checkpoints")


def test_a_run_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(state, "open", denied, raising=False)  # (root ignores chmod: deny the lock file's open)
    with pytest.raises(RunFolderError, match=rf"cannot write to the run folder {tmp_path} \(Permission denied\)"):
        Trainer(_recipe("train.iterations=2"), tmp_path, quiet=True).run()
    assert not (tmp_path / "recipe.yaml").exists()
