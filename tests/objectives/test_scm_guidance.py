"""SANA-Sprint's guidance in sCM (objective.guidance_set): per-sample CFG scales for the teacher's dx/dtheta, the same
scales as the student's guidance embedding, exact resume, and a diffusers export that samples at the eval scale."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stepdistill.eval.harness import generate_student
from stepdistill.recipe import RecipeError, load_recipe
from stepdistill.run import load_run
from stepdistill.training.trainer import Trainer, build

SET = [4.0, 4.5, 5.0]
N, SEED = 4, 3


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "latents.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((32, 4, 8, 8)).astype(np.float32))
    return path


def recipe(latents, *overrides, objective=None):
    objective = {"name": "scm", "guidance_set": SET, "tangent_warmup": 2, "adv_weight": 0.5, **(objective or {})}
    return load_recipe(None, ["train.batch_size=4", "train.checkpoint_every=1", "train.lr=1e-3", "eval.at_end=false",
                              f"data.path={latents}", *overrides],
                       data={"teacher": {"name": "fashion-t2i"}, "objective": objective})


@pytest.mark.parametrize("adv_weight", [0.0, 0.5])
def test_teacher_and_student_see_the_same_per_sample_scales_drawn_from_the_set(latents, adv_weight):
    b = build(recipe(latents, objective={"adv_weight": adv_weight}))
    student = b.nets.generator.net
    assert student.net.config.time_cond_proj_dim == 256 and student.guidance_input == 4.5  # the middle of the set
    seen = {"teacher": [], "student": []}
    teacher_guided, student_call = b.nets.teacher.guided, student._call_net

    def teacher_spy(x, t, cond, scale):
        seen["teacher"].append(scale)
        return teacher_guided(x, t, cond, scale)

    def student_spy(x, timestep, cond):
        seen["student"].append(student.guidance_input)
        return student_call(x, timestep, cond)

    b.nets.teacher.guided, student._call_net = teacher_spy, student_spy
    torch.manual_seed(0)
    out = b.objective.phases(0)[0].loss(b.batch(8), None)
    assert torch.isfinite(out.loss)
    w = seen["teacher"][0]
    assert torch.is_tensor(w) and w.shape == (8,) and set(w.tolist()) <= set(SET) and len(set(w.tolist())) > 1
    assert seen["student"] and all(torch.equal(s, w) for s in seen["student"])  # every student call of the step
    assert student.guidance_input == 4.5  # back to the eval scale after the step


def test_scm_with_guidance_set_trains_the_embedding_resumes_exactly_and_exports(latents, tmp_path):
    full = Trainer(recipe(latents, "train.iterations=2"), tmp_path / "full", quiet=True)
    full.run()
    weights = load_file(tmp_path / "full" / "checkpoints" / "step_0000002" / "weights.safetensors")
    assert weights["generator.net.net.time_embedding.cond_proj.weight"].abs().max() > 0  # the embedding learned
    Trainer(recipe(latents, "train.iterations=1"), tmp_path / "resumed", quiet=True).run()
    Trainer(recipe(latents, "train.iterations=2"), tmp_path / "resumed", quiet=True).run()
    resumed = load_file(tmp_path / "resumed" / "checkpoints" / "step_0000002" / "weights.safetensors")
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights)

    run = load_run(tmp_path / "full")
    assert run.student.net.guidance_input == 4.5
    expected = generate_student(run.student, run.teacher, N, SEED, N)
    assert torch.equal(expected, generate_student(full.student(), run.teacher, N, SEED, N))

    from diffusers import StableDiffusionPipeline

    from stepdistill.export import export_diffusers

    out = export_diffusers(run, tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.time_cond_proj_dim == 256
    # the export states the scale the student was evaluated at, in its metadata and its README's loading code
    assert json.loads((out / "stepdistill.json").read_text())["guidance_scale"] == 4.5
    assert "guidance_scale=4.5" in (out / "README.md").read_text()
    latents_at = lambda scale: pipe(run.teacher.eval_prompt_list(N), num_inference_steps=1,  # noqa: E731
                                    guidance_scale=scale, output_type="latent",
                                    generator=torch.Generator().manual_seed(SEED)).images
    torch.testing.assert_close(latents_at(4.5), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(latents_at(5.0), expected, atol=1e-4)  # the pipeline's scale reaches the student


def test_bad_guidance_keys_name_the_key_and_the_fix(latents, tiny_unet_folder):
    with pytest.raises(RecipeError, match="guidance_scale=3.0 and objective.guidance_set.*remove guidance_scale"):
        build(recipe(latents, objective={"guidance_scale": 3.0}))
    with pytest.raises(RecipeError, match=r"objective.guidance_set=\[\]"):
        build(recipe(latents, objective={"guidance_set": []}))
    with pytest.raises(RecipeError, match="eval_guidance=4.0.*guidance_set, which is not set"):
        build(recipe(latents, objective={"guidance_set": None, "eval_guidance": 4.0}))
    with pytest.raises(RecipeError, match="objective.guidance_set.*class-conditional"):
        build(load_recipe(None, [f"teacher.path={tiny_unet_folder}", f"data.path={latents}"],
                          data={"teacher": {"name": "diffusers"}, "objective": {"name": "scm", "guidance_set": SET}}))
    with pytest.raises(ValueError, match="objective.guidance_set is not supported by objective tbcm"):
        build(load_recipe(None, data={"teacher": {"name": "fashion-t2i"},
                                      "objective": {"name": "tbcm", "guidance_set": SET}}))
    custom = build(recipe(latents, objective={"eval_guidance": 6.0}))
    assert custom.nets.generator.net.guidance_input == 6.0
