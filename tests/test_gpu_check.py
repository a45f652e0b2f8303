"""scripts/gpu_check.py at test size on the CPU: the same code path as on a GPU, SD1.5- and SDXL-style layouts."""
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("gpu_check", Path("scripts/gpu_check.py"))
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_tiny_run_appends_a_section_naming_the_card(tmp_path):
    import torch

    report = tmp_path / "gpu.md"
    torch.set_num_threads(1)  # tiny networks: a second thread only adds contention on a shared CPU
    assert gpu_check.main(["--tiny", "--fp32", "--iterations", "1", "--warmup", "1", "--report", str(report),
                           "--objectives", "vsd", "sid", "nosuch"]) == 0
    text = report.read_text()
    assert text.startswith("# GPU benchmarks") and "## CPU (no GPU)" in text
    for size in ("tiny", "tiny-xl"):
        for objective in ("vsd", "sid"):
            row = next(line for line in text.splitlines() if line.startswith(f"| {size} | {objective} | sdpa |"))
            cells = row.split("|")
            assert float(cells[6]) > 0  # images/s
            assert cells[8].strip().endswith("GiB") and float(cells[8].split()[0]) > 0  # the planner's peak
    assert "| tiny | vsd | xformers | skipped: xformers" in text  # not installed here: a row that says so
    # a configuration that fails is a row saying why, after which the others still run
    assert "| tiny | nosuch | sdpa | failed: RecipeError: objective.name: unknown objective 'nosuch'" in text
    assert "| tiny-xl | sid | sdpa |" in text


def test_card_peaks_match_device_names():
    assert gpu_check.card_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.card_peak("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.card_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.card_peak("NVIDIA H200") == 989.0
    assert gpu_check.card_peak("Some Future Card") is None


@pytest.mark.parametrize("size", ["sd15", "sdxl"])
def test_full_size_configs_are_the_real_models(size):
    """Parameter counts of the real UNets (SD1.5: 859.5M, SDXL: 2567.5M), built on the meta device (no memory)."""
    import torch
    from diffusers import UNet2DConditionModel

    from stepdistill.teachers.synthetic import SIZES

    with torch.device("meta"):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **SIZES[size])
    n = sum(p.numel() for p in unet.parameters()) / 1e6
    assert n == pytest.approx({"sd15": 859.5, "sdxl": 2567.5}[size], abs=0.5)


def test_a_stopped_run_still_writes_its_rows_and_flop_counts(tmp_path, monkeypatch):
    """scripts/device_check.sh runs each part under `timeout`: a part stopped mid-way must still append the rows it
    has (and say it stopped), and the FLOP counts it made must reach the next part through --flops-cache."""
    import json

    import torch

    torch.set_num_threads(1)
    real, done = gpu_check.check, []

    def check(*args):
        if done:
            raise KeyboardInterrupt  # stands for the SystemExit that SIGTERM raises in the middle of a configuration
        done.append(real(*args))
        return done[-1]

    monkeypatch.setattr(gpu_check, "check", check)
    report, cache = tmp_path / "gpu.md", tmp_path / "flops.json"
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--tiny", "--fp32", "--iterations", "1", "--warmup", "1", "--sizes", "tiny", "--objectives",
                        "vsd", "--backends", "sdpa", "xformers", "--report", str(report), "--flops-cache", str(cache)])
    text = report.read_text()
    assert "| tiny | vsd | sdpa |" in text and "Stopped (time limit or interrupt) after 1 of 2 configurations." in text
    flops = done[0]["tflops"] * 1e12 * done[0]["step_ms"] / 1e3
    assert json.loads(cache.read_text())["tiny/vsd"] == pytest.approx(flops, rel=1e-9) and flops > 0
