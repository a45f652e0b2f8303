"""Exports of a LoRA student of a tiny Stable Diffusion teacher load in plain diffusers and reproduce its samples."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from stepdistill.eval.harness import generate_student
from stepdistill.export import export_diffusers, export_lora, export_safetensors
from stepdistill.recipe import load_recipe
from stepdistill.run import load_run
from stepdistill.training.trainer import Trainer

N, SEED = 4, 3


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 2-step LoRA student (rank 4, alpha 8: scale 2, so a loader that ignored alpha would differ), 2 iterations."""
    from conftest import train_tiny_sd_run

    root = tmp_path_factory.mktemp("t2i")
    run = train_tiny_sd_run(root, "train.iterations=2", "generator.steps=2", "generator.lora_rank=4",
                            "generator.lora_alpha=8")
    expected = generate_student(run.student, run.teacher, N, SEED, N)
    assert not torch.allclose(expected, generate_student(run.student, run.teacher, N, SEED, N, steps=1))
    return run, root, expected


def base_pipeline(run, scheduler_folder):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(run.teacher.folder, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = LCMScheduler.from_pretrained(scheduler_folder, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_latents(pipe, run):
    return pipe(run.teacher.eval_prompt_list(N), num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                generator=torch.Generator().manual_seed(SEED)).images


def test_diffusers_lora_loads_with_load_lora_weights_and_reproduces_the_student(lora_run, tmp_path):
    run, _, expected = lora_run
    out = export_lora(run, tmp_path / "lora")
    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    pipe = base_pipeline(run, out)
    pipe.load_lora_weights(out)
    torch.testing.assert_close(pipeline_latents(pipe, run), expected, rtol=1e-4, atol=1e-5)
    assert "load_lora_weights" in (out / "README.md").read_text()


def test_kohya_file_has_that_layout_with_the_real_alpha_and_loads_in_diffusers(lora_run, tmp_path):
    run, _, expected = lora_run
    out = export_lora(run, tmp_path / "lora")
    path = out / "lora_kohya.safetensors"
    state = load_file(path)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    assert all(m.startswith("lora_unet_") and "." not in m for m in modules)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0" in modules
    for m in modules:
        assert state[f"{m}.alpha"].item() == 8.0  # the real alpha, not the rank
        assert state[f"{m}.lora_down.weight"].shape[0] == 4 and state[f"{m}.lora_up.weight"].shape[1] == 4
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], float(meta["ss_network_alpha"]), meta["ss_network_module"]) == (
        "4", 8.0, "networks.lora")
    assert json.loads(meta["stepdistill.timesteps"]) == [999, 499] and meta["stepdistill.steps"] == "2"
    pipe = base_pipeline(run, out)
    pipe.load_lora_weights(out, weight_name="lora_kohya.safetensors")
    torch.testing.assert_close(pipeline_latents(pipe, run), expected, rtol=1e-4, atol=1e-5)


def test_checked_loader_warns_on_other_base_weights_and_refuses_another_architecture(lora_run, tmp_path):
    """The same base loads silently in fp32 or bf16; other base weights (a fine-tune) load with a warning; a layer of
    another shape is refused. (Before 2026-12-03 other weights were refused too: issue 24 asked for a warning.)"""
    import warnings

    from stepdistill.export.lora import load_lora

    run, _, expected = lora_run
    out = export_lora(run, tmp_path / "lora")
    pipe = base_pipeline(run, out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_lora(pipe, out, kohya=True)
        load_lora(base_pipeline(run, out).to(torch.bfloat16), out)
    torch.testing.assert_close(pipeline_latents(pipe, run), expected, rtol=1e-4, atol=1e-5)
    tuned = base_pipeline(run, out)
    block = tuned.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    with torch.no_grad():
        block.to_q.weight.add_(0.01)
    with pytest.warns(UserWarning, match="was distilled on other base weights"):
        load_lora(tuned, out)
    other = base_pipeline(run, out)
    block = other.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    block.to_q = torch.nn.Linear(block.to_q.in_features + 2, block.to_q.out_features, bias=False)
    with pytest.raises(ValueError, match=r"to_q has shape \[\d+, \d+\] here and \[\d+, \d+\] in the base"):
        load_lora(other, out)


def test_pipeline_folder_samples_the_trained_steps_with_from_pretrained_alone(lora_run, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    run, _, expected = lora_run
    out = export_diffusers(run, tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.timesteps.tolist() == [999, 499]
    torch.testing.assert_close(pipeline_latents(pipe, run), expected, rtol=1e-4, atol=1e-5)
    # fused weights as safetensors: a plain UNet state dict
    fused = load_file(export_safetensors(run, tmp_path / "fused.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    # the folder's UNet adds only a zero guidance projection (the pipeline then skips CFG)
    assert not unet.pop("time_embedding.cond_proj.weight").any()
    assert fused.keys() == unet.keys()
    assert all(torch.equal(v, unet[k]) for k, v in fused.items())


def test_a_consistency_student_export_takes_more_steps_and_others_refuse_them(lora_run, tmp_path):
    """An sCM student's pipeline with diffusers' default call (50 steps, guidance_scale 7.5) gives the student's own
    50-step samples, and reproduces it at other step counts; a VSD student's pipeline asked for more than its trained
    2 steps is refused by its scheduler, and at 2 steps the default guidance_scale changes nothing (no CFG)."""
    from conftest import make_tiny_sd_folder
    from diffusers import StableDiffusionPipeline

    folder = make_tiny_sd_folder(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a red shirt\na blue bag\n")
    np.savez(tmp_path / "latents.npz", x=np.random.default_rng(0).normal(size=(8, 4, 8, 8)).astype(np.float32))
    recipe = load_recipe(None, ["train.iterations=2", "train.batch_size=2", "eval.at_end=false",
                                f"data.path={tmp_path / 'latents.npz'}"],
                         data={"teacher": {"name": "sd", "path": str(folder), "prompts": str(tmp_path / "prompts.txt")},
                               "objective": {"name": "scm"}})
    Trainer(recipe, tmp_path / "run", quiet=True).run()
    run = load_run(tmp_path / "run")
    pipe = StableDiffusionPipeline.from_pretrained(export_diffusers(run, tmp_path / "pipe"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = run.teacher.eval_prompt_list(N)
    default = pipe(prompts, output_type="latent", generator=torch.Generator().manual_seed(SEED)).images
    torch.testing.assert_close(default, generate_student(run.student, run.teacher, N, SEED, N, steps=50),
                               rtol=1e-4, atol=1e-5)
    for k in (1, 4):
        got = pipe(prompts, num_inference_steps=k, guidance_scale=1.0, output_type="latent",
                   generator=torch.Generator().manual_seed(SEED)).images
        torch.testing.assert_close(got, generate_student(run.student, run.teacher, N, SEED, N, steps=k),
                                   rtol=1e-4, atol=1e-5)
    vsd = StableDiffusionPipeline.from_pretrained(export_diffusers(lora_run[0], tmp_path / "vsd"),
                                                  local_files_only=True)
    with pytest.raises(ValueError, match="reduce `num_inference_steps`"):  # diffusers names the limit
        vsd(prompts[:1], num_inference_steps=3, output_type="latent")
    got = vsd(lora_run[0].teacher.eval_prompt_list(N), num_inference_steps=2, output_type="latent",
              generator=torch.Generator().manual_seed(SEED))
    torch.testing.assert_close(got.images, lora_run[2], rtol=1e-4, atol=1e-5)
    assert "pass `num_inference_steps=2`" in (tmp_path / "vsd" / "README.md").read_text()


def test_lora_export_of_a_full_weight_run_names_the_fix(tiny_unet_folder, tmp_path):
    recipe = load_recipe(None, ["train.iterations=1", "train.batch_size=2", "eval.at_end=false"],
                         data={"teacher": {"name": "diffusers", "path": str(tiny_unet_folder)},
                               "objective": {"name": "vsd"}})
    Trainer(recipe, tmp_path / "run", quiet=True).run()
    with pytest.raises(ValueError, match="needs a LoRA run.*use --format diffusers or --format safetensors"):
        export_lora(load_run(tmp_path / "run"), tmp_path / "x")


def test_sample_takes_prompts_for_a_run_and_for_an_exported_pipeline(lora_run, tmp_path):
    """`stepdistill sample --run R --prompt ...` conditions on the given prompt; `sample --export` of a text-to-image
    folder samples it with its pipeline (before: refused), and asks for prompts when none are given."""
    from stepdistill.cli import main

    run, root, _ = lora_run
    out = export_diffusers(run, tmp_path / "pipe")
    (tmp_path / "p.txt").write_text("a red shirt\na blue bag\n")
    assert main(["sample", "--run", str(root / "run"), "--n", "2", "--prompt", "a green shoe",
                 "--out", str(tmp_path / "run.png")]) == 0
    assert main(["sample", "--export", str(out), "--n", "3", "--prompts", str(tmp_path / "p.txt"),
                 "--out", str(tmp_path / "export")]) == 0
    assert len(list((tmp_path / "export").glob("*.png"))) == 3 and (tmp_path / "run.png").exists()
    assert main(["sample", "--export", str(out), "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
