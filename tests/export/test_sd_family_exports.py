"""SDXL, SD3, FLUX and SANA LoRA students: a few distillation iterations, then every export loads in plain diffusers
(the family's own pipeline class) and reproduces the student's samples at its trained steps."""
import functools
import json

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.eval.harness import generate_student
from stepdistill.export import export_diffusers, export_lora
from stepdistill.export.diffusers_folder import pipeline_guidance
from stepdistill.export.lora import load_lora
from stepdistill.recipe import load_recipe
from stepdistill.run import load_run
from stepdistill.training.trainer import Trainer

N, SEED = 2, 3


@pytest.fixture(scope="module", params=["sdxl", "sd3", "flux", "sana"])
def family_run(request, tmp_path_factory):
    """A 2-step LoRA VSD student with CFG 2 on the teacher, 2 iterations (rank 2, alpha 4). FLUX: one step, as
    FluxPipeline re-noises packed latents from the global generator, which no seed can align with ours."""
    import conftest

    root = tmp_path_factory.mktemp(request.param)
    folder = getattr(conftest, f"make_tiny_{request.param}_folder")(root / request.param)
    (root / "prompts.txt").write_text("a red shirt\na blue bag\n")
    size = {"resolution": 16} if request.param == "flux" else {}
    data = {"teacher": {"name": "sd", "path": str(folder), "prompts": str(root / "prompts.txt"), **size},
            "objective": {"name": "vsd", "update_ratio": 1, "guidance_scale": 2.0}}
    recipe = load_recipe(None, ["train.batch_size=2", "train.iterations=2", "train.lr=1e-2", "eval.at_end=false",
                                f"generator.steps={1 if request.param == 'flux' else 2}", "generator.lora_rank=2",
                                "generator.lora_alpha=4"], data=data)
    Trainer(recipe, root / "run", quiet=True).run()
    run = load_run(root / "run")
    assert run.student.net.net.peft_config["default"].r == 2
    expected = generate_student(run.student, run.teacher, N, SEED, N)
    assert torch.isfinite(expected).all()
    return request.param, run, expected


def latents(pipe, run):
    """The pipeline's latents for the eval prompts with one seeded generator. StableDiffusion3Pipeline does not pass
    its generator to scheduler.step, so the re-noising between steps would come from the global RNG; to compare
    exactly, the scheduler's step draws from the same generator here (as SD1.5/SDXL pipelines do themselves)."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(SEED)
    if run.teacher.family == "sd3":
        pipe.scheduler.step = functools.partial(pipe.scheduler.step, generator=generator)
    family = run.teacher.family
    size = {"sana": dict(use_resolution_binning=False, height=32, width=32), "flux": dict(height=16, width=16)}
    out = pipe(run.teacher.eval_prompt_list(N), num_inference_steps=run.student.steps,
               guidance_scale=pipeline_guidance(run), output_type="latent", generator=generator,
               **size.get(family, {})).images
    return pipe._unpack_latents(out, 16, 16, pipe.vae_scale_factor) if family == "flux" else out


def test_pipeline_folder_reproduces_the_student_with_from_pretrained_alone(family_run, tmp_path):
    import diffusers

    family, run, expected = family_run
    out = export_diffusers(run, tmp_path / "pipe")
    pipe = getattr(diffusers, run.teacher.pipeline).from_pretrained(out, local_files_only=True)
    flow = family in ("sd3", "flux", "sana")
    assert type(pipe.scheduler).__name__ == ("FlowMatchLCMScheduler" if flow else "LCMScheduler")
    expected_steps = {"flux": [1000.0], "sd3": [1000.0, 500.0], "sana": [1000.0, 500.0]}.get(family, [999, 499])
    assert json.loads((out / "stepdistill.json").read_text())["timesteps"] == expected_steps
    torch.testing.assert_close(latents(pipe, run), expected, rtol=1e-4, atol=1e-4)


def test_lora_loads_with_load_lora_weights_and_reproduces_the_student(family_run, tmp_path):
    import diffusers

    family, run, expected = family_run
    out = export_lora(run, tmp_path / "lora")
    prefix = run.teacher.denoiser
    assert all(k.startswith(prefix + ".") for k in load_file(out / "pytorch_lora_weights.safetensors"))
    kohya = load_file(out / "lora_kohya.safetensors")
    assert all(k.startswith(f"lora_{prefix}_") for k in kohya)
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {4.0}
    pipe = getattr(diffusers, run.teacher.pipeline).from_pretrained(run.teacher.folder, local_files_only=True)
    scheduler = "FlowMatchLCMScheduler" if family in ("sd3", "flux", "sana") else "LCMScheduler"
    pipe.scheduler = getattr(diffusers, scheduler).from_pretrained(out, subfolder="scheduler")
    load_lora(pipe, out)  # checks the base's fingerprint, then pipe.load_lora_weights
    torch.testing.assert_close(latents(pipe, run), expected, rtol=1e-4, atol=1e-4)
