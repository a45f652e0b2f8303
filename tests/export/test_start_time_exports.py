"""Exports of a student that starts below t = 1 (generator.start_t): plain diffusers with the exported scheduler's
defaults reproduces it (DMD2's SDXL one-step student: pure noise, timestep 399), and a start a stock scheduler
cannot express is refused with the key to change."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.cli import main
from stepdistill.eval.harness import generate_student
from stepdistill.export import export_diffusers, export_lora
from stepdistill.recipe import load_recipe
from stepdistill.run import load_run
from stepdistill.train.trainer import Trainer

N, SEED = 4, 3


def train(tmp_path, folder, *overrides):
    run = tmp_path / "run"
    assert main(["train", "configs/fashion/vsd_1step.yaml", "teacher.name=diffusers", f"teacher.path={folder}",
                 "train.steps=2", "train.batch_size=4", "eval.at_end=false", "train.checkpoint_every=2", *overrides,
                 "--outdir", str(run), "--quiet"]) == 0
    return run


@pytest.mark.parametrize("steps,timesteps", [(1, [399]), (2, [399, 199])])
def test_unet_folder_starting_at_399_reproduces_stepdistill_sample(tmp_path, tiny_unet_folder, steps, timesteps):
    from diffusers import LCMScheduler, UNet2DModel

    run = train(tmp_path, tiny_unet_folder, f"generator.steps={steps}", "generator.start_t=0.4")
    assert main(["sample", "--run", str(run), "--n", "6", "--seed", "7", "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", "--run", str(run), "--format", "diffusers", "--out", str(tmp_path / "exp")]) == 0

    unet = UNet2DModel.from_pretrained(str(tmp_path / "exp"), subfolder="unet")
    scheduler = LCMScheduler.from_pretrained(str(tmp_path / "exp"), subfolder="scheduler")
    scheduler.set_timesteps(steps)  # the defaults: no timesteps= argument
    assert scheduler.timesteps.tolist() == timesteps and scheduler.init_noise_sigma == 1.0
    teacher = LCMScheduler.from_pretrained(str(tiny_unet_folder), subfolder="scheduler")
    assert torch.equal(scheduler.alphas_cumprod, teacher.alphas_cumprod[:400])  # the teacher's own alphabar_t
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 1, 8, 8, generator=gen) * scheduler.init_noise_sigma  # the README's loop
    labels = torch.arange(6) % 3
    for t in scheduler.timesteps:
        with torch.no_grad():
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x, generator=gen).prev_sample
    theirs = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    ours = np.stack([np.array(Image.open(tmp_path / "ours" / f"{i:05d}.png")) for i in range(6)])
    assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1
    # and a student that ignored start_t (first step at 999) would not match
    run_obj = load_run(run)
    assert run_obj.student.times[0] == pytest.approx(399 / 999)
    readme = (tmp_path / "exp" / "README.md").read_text()
    assert "timestep 399" in readme and "generator.start_t = 0.4" in readme
    meta = json.loads((tmp_path / "exp" / "stepdistill.json").read_text())
    assert meta["timesteps"] == timesteps and (meta["start_t"], meta["start_noise"]) == (0.4, "pure")
    assert main(["sample", "--export", str(tmp_path / "exp"), "--n", "6", "--seed", "7", "--out",
                 str(tmp_path / "exported")]) == 0
    exported = np.stack([np.array(Image.open(tmp_path / "exported" / f"{i:05d}.png")) for i in range(6)])
    assert np.array_equal(exported, theirs)


def test_schedule_noise_on_a_ddpm_teacher_is_refused_naming_the_key(tmp_path, tiny_unet_folder, capsys):
    """SiD-LSG's input sqrt(1 - alphabar) z: LCMScheduler's init_noise_sigma is fixed at 1."""
    run = train(tmp_path, tiny_unet_folder, "generator.start_t=0.626", "generator.start_noise=schedule",
                "train.steps=1", "train.checkpoint_every=1")
    assert main(["export", "--run", str(run), "--format", "diffusers", "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert "generator.start_noise=schedule" in err and "init_noise_sigma" in err and "--format safetensors" in err
    assert not (tmp_path / "exp").exists()
    assert main(["export", "--run", str(run), "--format", "safetensors", "--out", str(tmp_path / "w.safetensors")]) \
        == 0


@pytest.fixture(scope="module")
def sd_run_399(tmp_path_factory):
    """DMD2's SDXL one-step setting on a tiny SD teacher: a LoRA student at timestep 399 on pure noise."""
    from conftest import make_tiny_sd_folder

    root = tmp_path_factory.mktemp("t2i399")
    folder = make_tiny_sd_folder(root / "sd")
    (root / "prompts.txt").write_text("a red shirt\na blue bag\na green shoe\n")
    data = {"teacher": {"name": "sd", "path": str(folder), "prompts": str(root / "prompts.txt")},
            "objective": {"name": "vsd", "update_ratio": 1}}
    recipe = load_recipe(None, ["train.batch_size=4", "train.steps=1", "train.lr=1e-2", "eval.at_end=false",
                                "generator.lora_rank=4", "generator.start_t=0.4"], data=data)
    Trainer(recipe, root / "run", quiet=True).run()
    run = load_run(root / "run")
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
