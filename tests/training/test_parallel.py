"""Data parallelism (stepdistill/parallel.py): two CPU processes over gloo, launched by torchrun as a user would.

Two processes with the same global batch compute what one does (up to the order of the gradient sum), so their
weights, losses and sharded evaluations must agree with a one-process run to float rounding; and since the random
stream is the same on every process, a checkpoint resumes with either process count.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from stepdistill import parallel

COMMON = ["train.iterations=12", "train.checkpoint_every=6", "train.log_every=3", "train.batch_size=128",
          "train.sample_every=0", "eval.n=512", "eval.batch_size=100", "eval.curve_every=6", "eval.curve_n=300",
          "train.watch_every=6", "train.watch_n=200",  # watch samples sharded over 2 batches, checked in step
          "train.lr_decay=none"]  # a decay's schedule follows train.iterations, which the resume test moves 6 -> 12
RECIPES = {  # a conditional few-step student (the shared step index, per-row labels) in micro-batches; sCM (JVP,
    #          data rows, an objective's own state)
    "vsd_2step_conditional_accum": ["configs/toy/gmm_vsd_2step.yaml", "teacher.conditional=true",
                                    "train.grad_accum=2"],
    "scm": ["configs/toy/gmm_scm.yaml"],
    # a discriminator on the fake score whose logits only weight the generator's loss (the fake score is frozen in
    # the generator phase, trained in its own)
    "fdiv": ["configs/toy/gmm_fdiv_js.yaml"],
    # trajectories of the global batch's first conditions, 3 points each, some of them on both processes' rows
    "tbcm_conditional": ["configs/toy/gmm_tbcm.yaml", "teacher.conditional=true", "objective.route_pairs=3"],
}
FSDP = "train.fsdp=true"


def _train(outdir, recipe, processes, *extra, quiet=True):
    cmd = [sys.executable, "-m", "stepdistill", "train", *recipe, "--outdir", str(outdir), *COMMON, *extra]
    cmd += ["--quiet"] if quiet else []
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


def _assert_same_records(one, two):
    """Every logged value of two runs' jsonl files (losses, gradient norms, curve points) at the same steps."""
    for a, b in zip(_records(one), _records(two), strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (one.name, a["step"], k)


@pytest.fixture(scope="module", params=list(RECIPES))
def one_and_two(request, tmp_path_factory):
    recipe = RECIPES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    _train(root / "one", recipe, 1)
    out = _train(root / "two", recipe, 2)
    sharded = _train(root / "fsdp", recipe, 2, FSDP, quiet=False)
    return recipe, root, out, sharded


@pytest.mark.parametrize("two", ["two", "fsdp"])
def test_two_processes_compute_what_one_does(one_and_two, two):
    """Data-parallel, and with train.fsdp sharded (gradients averaged by FSDP's reduce-scatter, checkpoints gathered
    whole, curve points and the final evaluation from gathered networks)."""
    recipe, root, out, _ = one_and_two
    one, two = root / "one", root / two
    _assert_close(_weights(one, 12), _weights(two, 12))  # every trained network, the EMA, the objective's state
    for name in ("stats.jsonl", "curve.jsonl"):  # losses averaged over processes; curve points from sharded samples
        _assert_same_records(one / name, two / name)
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    for who in ("student", "teacher"):  # both sample sets were generated half by each process
        assert m1[who]["energy_distance"] == pytest.approx(m2[who]["energy_distance"], rel=1e-4)
    assert m1["protocol"] == m2["protocol"]
    assert out.count("run folder:") == 1  # one report, from process 0


def test_fsdp_holds_half_of_the_weights_on_each_process(one_and_two):
    *_, sharded = one_and_two
    held, total = (int(n.replace(",", "")) for n in
                   re.search(r"FSDP: each holds ([\d,]+) of the ([\d,]+) sharded", sharded).groups())
    assert total / 2 <= held < total / 2 + 1000  # a slice of each tensor, rounded up


@pytest.mark.parametrize("sharded", [(), (FSDP,)], ids=["data-parallel", "fsdp"])
def test_a_two_process_checkpoint_resumes_with_one_process_and_back(one_and_two, tmp_path, sharded):
    recipe, root, *_ = one_and_two
    _train(tmp_path / "a", recipe, 2, "train.iterations=6", *sharded)
    _train(tmp_path / "a", recipe, 1)  # 6 -> 12 in one process
    _assert_close(_weights(tmp_path / "a", 12), _weights(root / "one", 12))
    _train(tmp_path / "b", recipe, 1, "train.iterations=6")
    _train(tmp_path / "b", recipe, 2, *sharded)  # 6 -> 12 in two processes
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


def test_keyed_noise_draws_this_processes_rows_from_its_key_and_leaves_the_host_stream(monkeypatch):
    """train.noise: device. Only n rows (not the global batch's), the same for the same key and different for
    another iteration, phase, micro-batch or process; the host's stream, which checkpoints resume, is not touched."""
    monkeypatch.setattr(parallel, "world", lambda: 2)
    monkeypatch.setattr(parallel, "rank", lambda: 0)

    def draw(*key):
        with parallel.keyed_noise(torch.device("cpu"), 0, *key):
            return torch.cat([parallel.randn(4, 3, device="cpu").flatten(), parallel.rand(4, device="cpu")])

    torch.manual_seed(0)
    host = torch.get_rng_state()
    a = draw(5, 1, 0)
    assert a.shape == (16,) and torch.equal(torch.get_rng_state(), host) and torch.equal(a, draw(5, 1, 0))
    others = [draw(6, 1, 0), draw(5, 0, 0), draw(5, 1, 1), draw(5, 1, 0, 0)]
    monkeypatch.setattr(parallel, "rank", lambda: 1)
    others.append(draw(5, 1, 0))
    assert not any(torch.allclose(a, b) for b in others)
    with parallel.keyed_noise(torch.device("cpu"), 0, 5, 1, 0):  # no device: the host's shared stream, global rows
        torch.manual_seed(0)
        ours = parallel.randn(4)
    torch.manual_seed(0)
    assert torch.equal(ours, torch.randn(8)[4:])


def test_fsdp_refuses_what_it_cannot_shard_naming_the_fix():
    from stepdistill.recipe import RecipeError, load_recipe
    from stepdistill.training.trainer import check_fsdp

    with pytest.raises(RecipeError, match=r"generator.lora_rank=4.*Set train.fsdp=false"):
        check_fsdp(load_recipe("configs/toy/gmm_vsd.yaml", [FSDP, "generator.lora_rank=4"]))
    with pytest.raises(RecipeError, match="train.fsdp together with train.compile"):
        check_fsdp(load_recipe("configs/toy/gmm_vsd.yaml", [FSDP, "train.compile=true"]))
    check_fsdp(load_recipe("configs/toy/gmm_vsd.yaml", [FSDP]))


@pytest.mark.parametrize("objective", ["sid", "ladd"])
def test_fsdp_on_a_unet_matches_one_process(objective, tmp_path):
    """A UNet is sharded block by block (its down, mid and up blocks are units of their own). SiD differentiates
    through the frozen teacher and the fake score; LADD reads the frozen teacher's block outputs with hooks, which
    only works if the teacher's own unit keeps its weights through the backward pass."""
    import numpy as np

    np.savez(tmp_path / "real.npz", x=np.random.default_rng(0).standard_normal((64, 4, 8, 8), dtype=np.float32))
    recipe = tmp_path / "unet.yaml"
    recipe.write_text(f"teacher: {{name: synthetic-unet, size: tiny}}\nobjective: {{name: {objective}}}\n"
                      f"data: {{path: {tmp_path / 'real.npz'}}}\neval: {{at_end: false}}\n")
    short = ["train.iterations=4", "train.checkpoint_every=2", "train.batch_size=8", "train.sample_every=2",
             "train.log_every=1"]
    _train(tmp_path / "one", [str(recipe)], 1, *short)
    _train(tmp_path / "fsdp", [str(recipe)], 2, FSDP, *short)
    # every loss and gradient norm of the 4 iterations
    _assert_same_records(tmp_path / "one" / "stats.jsonl", tmp_path / "fsdp" / "stats.jsonl")
    # Adam moves a weight by up to about lr (1e-4) per step whatever the gradient's size, so a near-zero gradient
    # rounded differently (the sums run in another order) can move a weight by up to 4 x lr after 4 steps
    _assert_close(_weights(tmp_path / "one", 4), _weights(tmp_path / "fsdp", 4), tol=4e-4)
    assert (tmp_path / "fsdp" / "samples" / "step_0000002.png").exists()  # drawn by process 0 from gathered weights


HOST_FREE_RUN = '''
import json, sys
import torch
sys.path.insert(0, "tests")
from conftest import HostReads
from stepdistill import parallel
from stepdistill.recipe import load_recipe
from stepdistill.training import trainer as trainer_mod

case, out = sys.argv[1], sys.argv[2]
parallel.init()
trainer_mod.HOST_FREE = ("cpu",)  # the GPU's path: fused AdamW, no read of the non-finite flag
reads, host_draws, original = [], [], trainer_mod.Trainer.train_step

def counted(self):
    before = torch.get_rng_state()
    with HostReads() as mode:
        logs = original(self)
    reads.extend(mode.reads)
    host_draws.append(not torch.equal(before, torch.get_rng_state()))
    return logs

trainer_mod.Trainer.train_step = counted
launches = []  # for each all-reduce launched asynchronously: whether a backward pass was running then
backward, all_reduce = torch.autograd.backward, torch.distributed.all_reduce

def tracked_backward(*args, **kwargs):
    launches.append("backward")
    try:
        return backward(*args, **kwargs)
    finally:
        launches.append("done")

def tracked_all_reduce(*args, async_op=False, **kwargs):
    if async_op:
        launches.append("launch")
    return all_reduce(*args, async_op=async_op, **kwargs)

torch.autograd.backward, torch.distributed.all_reduce = tracked_backward, tracked_all_reduce
parallel.BUCKET = 300  # several buckets even in the toy's MLP
if case == "differ" and parallel.rank() == 1:  # process 1 never gets one gradient at iteration 1, one of the first
    ready = parallel.GradientSync._ready          # bucket's: its later buckets must still go out after that one

    def dropping(self, i, param):
        if trainer.step == 1 and i == len(self.params) - 1:
            param.grad = None
            return
        return ready(self, i, param)

    parallel.GradientSync._ready = dropping
overrides = ["teacher.hidden=32", "train.batch_size=64", "train.iterations=6", "train.log_every=3",
             "train.checkpoint_every=6", "train.ema=0.9", "train.sample_every=0", "eval.at_end=false",
             "objective.update_ratio=1"] + (["train.fsdp=true"] if case == "fsdp" else []) + \
    (["train.noise=device"] if case == "device-noise" else [])
trainer = trainer_mod.Trainer(load_recipe("configs/toy/gmm_vsd.yaml", overrides), out, quiet=True)
try:
    trainer.run()
    error = None
except RuntimeError as e:
    error = str(e)
inside = outside = 0
state = "done"
for event in launches:
    state = event if event != "launch" else state
    inside += event == "launch" and state == "backward"
    outside += event == "launch" and state == "done"
# a file per process: two processes printing to one pipe can interleave their lines
with open(f"{out}.result{parallel.rank()}.json", "w") as f:
    json.dump({"rank": parallel.rank(), "host_free": trainer.host_free, "reads": reads, "error": error,
               "step": trainer.step, "launched": [inside, outside], "host_draws": any(host_draws),
               "buckets": len(trainer.syncs["generator"].buckets)}, f)
parallel.finish(0)
'''


@pytest.mark.parametrize("case", ["data-parallel", "fsdp", "differ", "device-noise"])
def test_two_processes_on_the_gpu_path_read_nothing_back_between_log_steps(case, tmp_path):
    """With the GPU's optimizer path forced on (fused AdamW, trainer.HOST_FREE) two processes, data-parallel or
    sharded, make no host read inside an iteration: the gradient average checks on the device that every process
    held the same gradients, the clipping scale stays a tensor. The average's buckets are launched during the
    backward pass as their gradients complete. They train what one foreach process trains. A phase
    that ran differently on one process (a gradient missing there) is skipped on both and stops the run at the next
    log step with an error, rather than hanging in mismatched collectives. With train.noise: device nothing is
    drawn on the host either."""
    (tmp_path / "run.py").write_text(HOST_FREE_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "run.py"), case, str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("two.result*.json"))]
    assert len(results) == 2 and all(r["host_free"] and r["reads"] == [] for r in results)
    if case == "data-parallel":  # the averages overlap the backward pass: every bucket goes out while it runs
        assert all(r["buckets"] > 1 and r["launched"][0] > 0 and r["launched"][1] == 0 for r in results)
    if case == "differ":
        assert all(r["step"] == 3 and "ran differently on some process" in r["error"] for r in results)
        return
    assert all(r["error"] is None for r in results)
    assert all(r["host_draws"] == (case != "device-noise") for r in results)  # the CPU's stream untouched
    if case == "device-noise":  # each process draws its own rows from its own key: not what one process draws
        return
    from stepdistill.recipe import load_recipe
    from stepdistill.training.trainer import Trainer

    Trainer(load_recipe("configs/toy/gmm_vsd.yaml", [
        "teacher.hidden=32", "train.batch_size=64", "train.iterations=6", "train.log_every=3",
        "train.checkpoint_every=6", "train.ema=0.9", "train.sample_every=0", "eval.at_end=false",
        "objective.update_ratio=1"]), tmp_path / "one", quiet=True).run()
    _assert_close(_weights(tmp_path / "one", 6), _weights(tmp_path / "two", 6))
    _assert_same_records(tmp_path / "one" / "stats.jsonl", tmp_path / "two" / "stats.jsonl")


def test_a_budgeted_warm_start_runs_the_same_count_on_every_process(tmp_path):
    """generator.warm_start_share under train.max_minutes with FSDP: each process reads its own clock, yet they agree
    on the seconds and on every re-plan, so the sharded forwards stay in step and the run ends; the logged count (a
    mean over processes) is a whole number below the recipe's."""
    run = tmp_path / "run"
    _train(run, ["configs/toy/gmm_vsd.yaml"], 2, FSDP, "generator.warm_start_iterations=100000",
           "generator.warm_start_pairs=256", "generator.warm_start_share=0.5", "train.max_minutes=0.1")
    done = json.loads((run / "train_summary.json").read_text())["warm_start/iterations"]
    assert 0 < done < 100000 and done == int(done)
