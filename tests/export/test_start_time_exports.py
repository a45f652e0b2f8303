"""Exports of a student that starts below t = 1 (generator.start_t): plain diffusers with the exported scheduler's
defaults reproduces it (DMD2's SDXL one-step student: pure noise, timestep 399), and a start a stock scheduler
cannot express is refused with the key to change. The UNet folder's case is tests/test_cli.py's export test."""
import json

import pytest
import torch

from stepdistill.cli import main
from stepdistill.eval.harness import generate_student
from stepdistill.export import export_diffusers, export_lora

N, SEED = 4, 3


def train(tmp_path, folder, *overrides):
    run = tmp_path / "run"
    assert main(["train", "configs/fashion/vsd_1step.yaml", "teacher.name=diffusers", f"teacher.path={folder}",
                 "train.iterations=2", "train.batch_size=4", "eval.at_end=false", "train.checkpoint_every=2",
                 *overrides, "--outdir", str(run), "--quiet"]) == 0
    return run


def test_schedule_noise_on_a_ddpm_teacher_is_refused_naming_the_key(tmp_path, tiny_unet_folder, capsys):
    """SiD-LSG's input sqrt(1 - alphabar) z: LCMScheduler's init_noise_sigma is fixed at 1."""
    run = train(tmp_path, tiny_unet_folder, "generator.start_t=0.626", "generator.start_noise=schedule",
                "train.iterations=1", "train.checkpoint_every=1")
    assert main(["export", "--run", str(run), "--format", "diffusers", "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert "generator.start_noise=schedule" in err and "init_noise_sigma" in err and "--format safetensors" in err
    assert not (tmp_path / "exp").exists()
    assert main(["export", "--run", str(run), "--format", "safetensors", "--out", str(tmp_path / "w.safetensors")]) \
        == 0


@pytest.fixture(scope="module")
def sd_run_399(tmp_path_factory):
    """DMD2's SDXL one-step setting on a tiny SD teacher: a LoRA student at timestep 399 on pure noise."""
    from conftest import train_tiny_sd_run

    run = train_tiny_sd_run(tmp_path_factory.mktemp("t2i399"), "train.iterations=1", "generator.lora_rank=4",
                            "generator.start_t=0.4")
    return run, generate_student(run.student, run.teacher, N, SEED, N)


def latents(pipe, run):
    pipe.set_progress_bar_config(disable=True)
    return pipe(run.teacher.eval_prompt_list(N), num_inference_steps=1, guidance_scale=1.0, output_type="latent",
                generator=torch.Generator().manual_seed(SEED)).images


def test_pipeline_and_lora_exports_starting_at_399_reproduce_the_student(sd_run_399, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    run, expected = sd_run_399
    out = export_diffusers(run, tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [399]
    torch.testing.assert_close(latents(pipe, run), expected, rtol=1e-4, atol=1e-5)
    assert "timestep 399" in (out / "README.md").read_text()

    out = export_lora(run, tmp_path / "lora")
    pipe = StableDiffusionPipeline.from_pretrained(run.teacher.folder, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    pipe.load_lora_weights(out)
    torch.testing.assert_close(latents(pipe, run), expected, rtol=1e-4, atol=1e-5)
    readme = (out / "README.md").read_text()
    assert "timestep 399" in readme and "generator.start_t = 0.4" in readme
    info = json.loads((out / "stepdistill.json").read_text())
    assert json.loads(info["timesteps"]) == [399] and info["start_t"] == "0.4"
