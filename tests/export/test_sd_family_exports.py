"""SDXL, SD3 and SANA LoRA students: a few distillation iterations, then every export loads in plain diffusers (the
family's own pipeline class) and reproduces the student's samples at its trained steps."""
import functools
import json

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.eval.harness import generate_student
from stepdistill.export import export_diffusers, export_lora
from stepdistill.export.lora import load_lora
from stepdistill.recipe import load_recipe
from stepdistill.run import load_run
from stepdistill.train.trainer import Trainer

N, SEED = 2, 3


@pytest.fixture(scope="module", params=["sdxl", "sd3", "sana"])
def family_run(request, tmp_path_factory):
    """A 2-step LoRA VSD student with CFG 2 on the teacher, 2 iterations (rank 2, alpha 4)."""
    import conftest

    root = tmp_path_factory.mktemp(request.param)
    folder = getattr(conftest, f"make_tiny_{request.param}_folder")(root / request.param)
    (root / "prompts.txt").write_text("a red shirt\na blue bag\n")
    data = {"teacher": {"name": "sd", "path": str(folder), "prompts": str(root / "prompts.txt")},
            "objective": {"name": "vsd", "update_ratio": 1, "guidance_scale": 2.0}}
    recipe = load_recipe(None, ["train.batch_size=2", "train.steps=2", "train.lr=1e-2", "eval.at_end=false",
                                "generator.steps=2", "generator.lora_rank=2", "generator.lora_alpha=4"], data=data)
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
    tiny = dict(use_resolution_binning=False, height=32, width=32) if run.teacher.family == "sana" else {}  # 1024 px
    return pipe(run.teacher.eval_prompt_list(N), num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                generator=generator, **tiny).images


def test_pipeline_folder_reproduces_the_student_with_from_pretrained_alone(family_run, tmp_path):
    import diffusers

    family, run, expected = family_run
    out = export_diffusers(run, tmp_path / "pipe")
    pipe = getattr(diffusers, run.teacher.pipeline).from_pretrained(out, local_files_only=True)
    flow = family in ("sd3", "sana")
    assert type(pipe.scheduler).__name__ == ("FlowMatchLCMScheduler" if flow else "LCMScheduler")
    assert json.loads((out / "stepdistill.json").read_text())["timesteps"] == ([1000.0, 500.0] if flow else [999, 499])
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
    scheduler = "FlowMatchLCMScheduler" if family in ("sd3", "sana") else "LCMScheduler"
    pipe.scheduler = getattr(diffusers, scheduler).from_pretrained(out, subfolder="scheduler")
    load_lora(pipe, out)  # checks the base's fingerprint, then pipe.load_lora_weights
    torch.testing.assert_close(latents(pipe, run), expected, rtol=1e-4, atol=1e-4)
