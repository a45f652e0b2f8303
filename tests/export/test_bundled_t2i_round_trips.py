"""The round trips of tests/export/ on the bundled text-to-image teacher (checkpoints/fashion-t2i, a miniature SD
1.x pipeline trained by this project) rather than a folder built from config: a LoRA student's diffusers pipeline
folder, its LoRA and its original-layout single file all load in plain diffusers and reproduce its latents."""
import pytest
import torch

from stepdistill.eval.harness import generate_student
from stepdistill.export import export_diffusers, export_lora, export_single_file
from stepdistill.export.diffusers_folder import lcm_scheduler
from stepdistill.recipe import load_recipe
from stepdistill.run import load_run
from stepdistill.training.trainer import Trainer

N, SEED = 4, 3


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundled_t2i")
    recipe = load_recipe(None, ["train.iterations=2", "train.batch_size=4", "train.lr=1e-2", "eval.at_end=false",
                                "generator.steps=2", "generator.lora_rank=4", "generator.lora_alpha=8"],
                         data={"teacher": {"name": "fashion-t2i"}, "objective": {"name": "vsd", "update_ratio": 1}})
    Trainer(recipe, root / "run", quiet=True).run()
    run = load_run(root / "run")
    return run, generate_student(run.student, run.teacher, N, SEED, N)


@pytest.mark.parametrize("fmt", ["diffusers", "lora", "single-file"])
def test_the_bundled_teachers_student_round_trips(bundled_run, fmt, tmp_path):
    from diffusers import StableDiffusionPipeline

    run, expected = bundled_run
    base = dict(safety_checker=None, requires_safety_checker=False, local_files_only=True)
    if fmt == "diffusers":  # the default guidance_scale: the folder's UNet makes the pipeline skip CFG
        pipe = StableDiffusionPipeline.from_pretrained(export_diffusers(run, tmp_path / "pipe"), local_files_only=True)
    elif fmt == "lora":
        pipe = StableDiffusionPipeline.from_pretrained(run.teacher.folder, **base)
        pipe.load_lora_weights(export_lora(run, tmp_path / "lora"))
    else:
        out = export_single_file(run, tmp_path / "model.safetensors", dtype="fp32")
        pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(run.teacher.folder), **base)
    if fmt != "diffusers":  # the teacher's scheduler and UNet (no guidance projection): the LCM rule, no CFG
        pipe.scheduler, kw = lcm_scheduler(run)[0], {"guidance_scale": 1.0}
    else:
        kw = {}
    pipe.set_progress_bar_config(disable=True)
    got = pipe(run.teacher.eval_prompt_list(N), num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(SEED), **kw).images
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
