"""Training, sampling and evaluation on a GPU (skipped without CUDA; run them where a GPU is at hand:
`python -m pytest tests/training/test_gpu.py`).

Every random draw comes from the CPU's stream (parallel.py), so a GPU run sees the same noise, times and batches as a
CPU run: its losses and weights must match the CPU's to float rounding (TF32 convolutions and reduction order).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

COMMON = ["train.iterations=4", "train.checkpoint_every=4", "train.log_every=1", "train.sample_every=0",
          "train.max_minutes=0", "eval.n=256", "eval.batch_size=128", "eval.teacher_nfe=4"]
GMM = ["train.batch_size=64", "generator.warm_start_iterations=0"]
FASHION = ["train.batch_size=8", "generator.warm_start_iterations=2", "generator.warm_start_pairs=16",
           "generator.warm_start_nfe=4"]
RECIPES = {  # every objective on the exact gmm teacher; UNet, CFG, LoRA and VAE paths on the bundled image teachers
    **{name: [f"configs/toy/{name}.yaml", *GMM] for name in (
        "gmm_vsd", "gmm_vsd_2step", "gmm_vsd_gan", "gmm_fdiv_js", "gmm_sid", "gmm_sid_2step", "gmm_disback",
        "gmm_scm", "gmm_scm_ladd", "gmm_tbcm", "gmm_ladd", "gmm_asd_2step")},
    "fashion_vsd": ["configs/fashion/vsd_1step.yaml", *FASHION],
    "fashion_sid_lsg": ["configs/fashion/sid_lsg_2step.yaml", *FASHION],
    "fashion_scm_ladd": ["configs/fashion/scm_ladd_1step.yaml", *FASHION],
    "t2i_lora": ["configs/fashion_t2i/vsd_lora_1step.yaml", *FASHION],
}


def _stepdistill(*args, cpu=False):
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})}
    done = subprocess.run([sys.executable, "-m", "stepdistill", *args], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _losses(run):
    return [{k: v for k, v in json.loads(line).items() if k.startswith("loss/")}
            for line in (run / "stats.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_gpu_run_trains_what_a_cpu_run_does(name, tmp_path):
    recipe, *overrides = RECIPES[name]
    if name == "fashion_scm_ladd":  # sCM trains on real images; a GPU machine without the dataset can't say anything
        from stepdistill.data import fashion

        try:
            fashion.load_raw("train")
        except FileNotFoundError as e:
            pytest.skip(str(e))
    for where in ("gpu", "cpu"):
        _stepdistill("train", recipe, "--outdir", str(tmp_path / where), "--quiet", *COMMON, *overrides,
                     cpu=where == "cpu")
    gpu, cpu = (tmp_path / w for w in ("gpu", "cpu"))
    first_gpu, first_cpu = _losses(gpu)[0], _losses(cpu)[0]  # the first iteration: same weights, same draws
    assert first_gpu.keys() == first_cpu.keys()
    for k in first_gpu:
        assert first_gpu[k] == pytest.approx(first_cpu[k], rel=2e-2, abs=1e-4), k
    w_gpu, w_cpu = (load_file(r / "checkpoints" / "step_0000004" / "weights.safetensors") for r in (gpu, cpu))
    assert w_gpu.keys() == w_cpu.keys()
    for k in w_gpu:  # four Adam steps: a near-zero gradient's sign may differ by rounding, so up to 2 x 4 x lr apart
        torch.testing.assert_close(w_gpu[k], w_cpu[k], atol=1e-2, rtol=2e-2, msg=k)
    m_gpu, m_cpu = (json.loads((r / "metrics.json").read_text()) for r in (gpu, cpu))
    assert m_gpu["protocol"] == m_cpu["protocol"]


def test_sample_and_eval_use_the_gpu_and_agree_with_the_cpu(tmp_path):
    run = tmp_path / "run"
    _stepdistill("train", *RECIPES["fashion_vsd"], "--outdir", str(run), "--quiet", *COMMON)
    out = {}
    for where in ("gpu", "cpu"):
        _stepdistill("sample", "--run", str(run), "--n", "16", "--out", str(tmp_path / f"{where}.png"),
                     cpu=where == "cpu")
        _stepdistill("eval", "--run", str(run), "eval.n=256", cpu=where == "cpu")
        out[where] = json.loads((run / "metrics.json").read_text())
    assert out["gpu"]["student"]["fd"] == pytest.approx(out["cpu"]["student"]["fd"], rel=2e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_train_what_one_does(tmp_path):
    recipe = RECIPES["gmm_scm"]
    _stepdistill("train", *recipe, "--outdir", str(tmp_path / "one"), "--quiet", *COMMON)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "stepdistill",
           "train", *recipe, "--outdir", str(tmp_path / "two"), "--quiet", *COMMON]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two"), strict=True):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=2e-2, abs=1e-4), k


# SANA-Sprint's recipe (sCM + LADD, bf16, gradient checkpointing, guidance embedding) at test size: the transformer's
# JVP and the token heads of the discriminator on the teacher's blocks
SPRINT = ["configs/plan/sana_1600m_sprint.yaml", "teacher.size=tiny-sana", "train.batch_size=4"]
# and train.noise=device: the per-sample noise drawn on the GPU from keyed generators, nothing copied up
HOST_FREE = {"tiny_sana_sprint": SPRINT,
             "fashion_vsd_device_noise": [*RECIPES["fashion_vsd"], "train.noise=device"],
             "gmm_scm_device_noise": [*RECIPES["gmm_scm"], "train.noise=device"]}


@pytest.mark.parametrize("name", ["gmm_vsd", "gmm_sid", "gmm_scm", "gmm_fdiv_js", "gmm_vsd_gan", "fashion_vsd",
                                  *HOST_FREE])
def test_a_gpu_iteration_never_waits_for_the_host(name, tmp_path):
    """Fused AdamW takes the non-finite flag, the logged values stay on the GPU and the CPU's noise goes up through
    pinned memory: torch's sync debug mode raises on any synchronising call inside an iteration (log steps aside)."""
    from stepdistill.recipe import load_recipe
    from stepdistill.training.trainer import Trainer

    recipe, *overrides = HOST_FREE.get(name) or RECIPES[name]
    trainer = Trainer(load_recipe(recipe, [*overrides, *COMMON, "eval.at_end=false", "train.watch_every=0"]),
                      tmp_path, quiet=True)
    assert trainer.host_free
    for _ in range(2):  # the first iteration allocates (moments, cuBLAS workspaces)
        trainer.train_step()
        trainer.step += 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            logs = trainer.train_step()
            trainer.step += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(torch.as_tensor(v)) for v in logs.values()) and int(trainer.nonfinite) == 0
