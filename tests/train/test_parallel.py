"""Data parallelism (stepdistill/parallel.py): two CPU processes over gloo, launched by torchrun as a user would.

Two processes with the same global batch compute what one does (up to the order of the gradient sum), so their
weights, losses and sharded evaluations must agree with a one-process run to float rounding; and since the random
stream is the same on every process, a checkpoint resumes with either process count.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from stepdistill import parallel

COMMON = ["train.steps=12", "train.checkpoint_every=6", "train.log_every=3", "train.batch_size=128",
          "train.sample_every=0", "eval.n=512", "eval.batch_size=100", "eval.curve_every=6", "eval.curve_n=300"]
RECIPES = {  # a conditional few-step student (the shared step index, per-row labels) in micro-batches; sCM (JVP,
    #          data rows, an objective's own state)
    "vsd_2step_conditional_accum": ["configs/toy/gmm_vsd_2step.yaml", "teacher.conditional=true",
                                    "train.grad_accum=2"],
    "scm": ["configs/toy/gmm_scm.yaml"],
}


def _train(outdir, recipe, processes, *extra):
    cmd = [sys.executable, "-m", "stepdistill", "train", *recipe, "--outdir", str(outdir), "--quiet", *COMMON, *extra]
    if processes > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m",
                    "stepdistill"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _weights(run, step):
    return load_file(run / "checkpoints" / f"step_{step:07d}" / "weights.safetensors")


def _assert_close(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=tol, msg=k)


def _records(path):
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


@pytest.fixture(scope="module", params=list(RECIPES))
def one_and_two(request, tmp_path_factory):
    recipe = RECIPES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    _train(root / "one", recipe, 1)
    out = _train(root / "two", recipe, 2)
    return recipe, root, out


def test_two_processes_compute_what_one_does(one_and_two):
    recipe, root, out = one_and_two
    one, two = root / "one", root / "two"
    _assert_close(_weights(one, 12), _weights(two, 12))  # every trained network, the EMA, the objective's state
    for name in ("stats.jsonl", "curve.jsonl"):  # losses averaged over processes; curve points from sharded samples
        for a, b in zip(_records(one / name), _records(two / name), strict=True):
            assert a.keys() == b.keys() and a["step"] == b["step"]
            for k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (name, a["step"], k)
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    for who in ("student", "teacher"):  # both sample sets were generated half by each process
        assert m1[who]["energy_distance"] == pytest.approx(m2[who]["energy_distance"], rel=1e-4)
    assert m1["protocol"] == m2["protocol"]
    assert out.count("run folder:") == 1  # one report, from process 0


def test_a_two_process_checkpoint_resumes_with_one_process_and_back(one_and_two, tmp_path):
    recipe, root, _ = one_and_two
    _train(tmp_path / "a", recipe, 2, "train.steps=6")
    _train(tmp_path / "a", recipe, 1)  # 6 -> 12 in one process
    _assert_close(_weights(tmp_path / "a", 12), _weights(root / "one", 12))
    _train(tmp_path / "b", recipe, 1, "train.steps=6")
    _train(tmp_path / "b", recipe, 2)  # 6 -> 12 in two processes
    _assert_close(_weights(tmp_path / "b", 12), _weights(root / "one", 12))


def test_a_global_batch_that_does_not_split_is_an_error_naming_the_fix(monkeypatch):
    monkeypatch.setattr(parallel, "world", lambda: 2)
    assert parallel.local_batch(64) == 32
    with pytest.raises(ValueError, match=r"train.batch_size=63 is the global batch.*train.batch_size=64"):
        parallel.local_batch(63)


def test_one_process_draws_exactly_what_torch_draws():
    """The single-process path is the plain torch call, so one-process runs are unchanged bit for bit."""
    x = torch.zeros(5, 3)
    for ours, theirs in [(lambda: parallel.randn(5, 3), lambda: torch.randn(5, 3)),
                         (lambda: parallel.rand(7), lambda: torch.rand(7)),
                         (lambda: parallel.randn_like(x), lambda: torch.randn_like(x))]:
        torch.manual_seed(3)
        a = ours()
        torch.manual_seed(3)
        assert torch.equal(a, theirs())
