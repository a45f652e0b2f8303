"""Real-size dry runs (stepdistill/plan.py's dry_run): one training iteration of every objective on every network
family at its real size (SD1.5, SDXL, SD3-medium, FLUX-dev, SANA-1.6B, random weights from teachers/synthetic.py) on
meta tensors: each kind of phase forward and backward, AdamW's step and the EMA's update. Shape, dtype and device
errors at SDXL or FLUX size show up here without a GPU, and so does an operation whose output size depends on the
data (no meta kernel; on a GPU it would make the iteration wait for the host), a value read back from a device tensor
or a blocking copy up from host memory (plan.HostSync).

`make test` runs every objective at SD1.5 size, vsd on every family and LADD on SANA (13 runs, about 3 minutes on 2
CPU cores); `make test-bench` the whole matrix (40 runs)."""
from __future__ import annotations

import pytest

from stepdistill.plan import dry_run
from stepdistill.recipe import load_recipe

FAMILIES = ["sd15", "sdxl", "sd3-medium", "flux-dev", "sana-1600m"]
OBJECTIVES = {  # what brings every trained network into the first iterations
    "vsd": [], "fdiv": [], "sid": [], "scm": [], "tbcm": [], "ladd": [],
    "disback": ["objective.record_iterations=1", "objective.record_every=1"],  # stage 2 (the generator) at once
    "asd": ["generator.steps=2"],  # it needs a few-step student
}
QUICK = {(o, "sd15") for o in OBJECTIVES} | {("vsd", f) for f in FAMILIES} | {("ladd", "sana-1600m")}


def cases():
    for family in FAMILIES:
        for objective in OBJECTIVES:
            marks = [] if (objective, family) in QUICK else [pytest.mark.bench]
            yield pytest.param(objective, family, id=f"{objective}-{family}", marks=marks)


@pytest.mark.parametrize("objective,family", list(cases()))
def test_one_real_size_iteration_runs_on_meta_tensors(objective, family):
    recipe = lambda: load_recipe(  # noqa: E731
        None, ["train.batch_size=2", "train.ema=0.99", "eval.at_end=false", *OBJECTIVES[objective]],
        data={"teacher": {"name": "synthetic", "size": family}, "objective": {"name": objective}})
    assert dry_run(recipe()) == []


def test_the_dry_run_names_where_a_gpu_would_wait_for_the_host(monkeypatch):
    """What made sCM's GPU iterations wait (found on an H200): a host tensor broadcast against a device tensor with a
    blocking copy. The meta pass flags such copies and values read back, naming the line."""
    from stepdistill.diffusion import trigflow

    recipe = load_recipe("configs/toy/gmm_scm.yaml", ["train.batch_size=8", "eval.at_end=false"])
    assert dry_run(recipe) == []
    monkeypatch.setattr(trigflow, "bcast", lambda v, like: v.reshape(-1, *[1] * (like.ndim - 1)).to(like))
    notes = dry_run(recipe)
    assert notes and all(n.startswith("phase generator makes the host wait for the GPU: a blocking copy from host "
                                      "memory at stepdistill/diffusion/trigflow.py:") for n in notes), notes
    monkeypatch.undo()
    real = trigflow.TrigFlowSpace.noise
    monkeypatch.setattr(trigflow.TrigFlowSpace, "noise", lambda self, x0, eps, theta: real(self, x0, eps, theta)
                        * (1 + 0 * float(x0.std())))  # a value read back, as a careless log would
    assert any("a value read back at stepdistill/objectives/scm.py:" in n for n in dry_run(recipe))  # its caller
