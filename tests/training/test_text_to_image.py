"""Distillation of a latent text-to-image teacher (a tiny Stable Diffusion folder) with LoRA students."""
import torch
from safetensors.torch import load_file

from stepdistill.recipe import load_recipe
from stepdistill.run import load_run
from stepdistill.training.trainer import Trainer


def sd_recipe(folder, *overrides):
    data = {"teacher": {"name": "sd", "path": str(folder), "prompts": str(folder.parent / "prompts.txt")},
            "objective": {"name": "vsd", "guidance_scale": 3.0, "update_ratio": 2}}
    return load_recipe(None, ["train.batch_size=4", "train.checkpoint_every=2", "train.ema=0.9", "eval.at_end=false",
                              "generator.lora_rank=4", *overrides], data=data)


def test_lora_vsd_on_sd_trains_adapters_only_resumes_exactly_and_reloads(tiny_sd_folder, tmp_path):
    full = Trainer(sd_recipe(tiny_sd_folder, "train.iterations=4"), tmp_path / "full", quiet=True)
    teacher_before = {k: v.clone() for k, v in full.nets.teacher.state_dict().items()}
    full.run()
    assert all(torch.equal(v, full.nets.teacher.state_dict()[k]) for k, v in teacher_before.items())
    weights = load_file(tmp_path / "full" / "checkpoints" / "step_0000004" / "weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"generator", "fake_score", "ema"}
    assert all("lora_" in k for k in weights)  # the base weights are the teacher's: never saved
    adapters = [v for k, v in weights.items() if k.startswith("generator.") and "lora_B" in k]
    assert adapters and any(v.abs().max() > 0 for v in adapters)  # the generator's adapters moved off zero
    assert (tmp_path / "full" / "samples" / "final.png").exists()

    Trainer(sd_recipe(tiny_sd_folder, "train.iterations=2"), tmp_path / "resumed", quiet=True).run()
    Trainer(sd_recipe(tiny_sd_folder, "train.iterations=4"), tmp_path / "resumed", quiet=True).run()
    resumed = load_file(tmp_path / "resumed" / "checkpoints" / "step_0000004" / "weights.safetensors")
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights)

    run = load_run(tmp_path / "full")
    z, cond = torch.randn(3, 4, 8, 8), run.teacher.eval_cond(3)
    assert torch.equal(run.student(z, cond), full.student()(z, cond))


def test_a_first_run_on_an_sd_folder_with_default_evaluation_finishes(tiny_sd_folder, tmp_path, capsys):
    """teacher sd has no built-in metric: the default eval.metrics=[domain] becomes no final evaluation, said once at
    the start (before, the run exited 2 after training); an evaluation that cannot run is refused before training."""
    import pytest

    from stepdistill.errors import RecipeError

    data = {"teacher": {"name": "sd", "path": str(tiny_sd_folder), "prompts": str(tmp_path / "prompts.txt")},
            "objective": {"name": "vsd"}}
    recipe = load_recipe(None, ["train.iterations=1", "train.batch_size=2"], data=data)
    assert recipe.eval.at_end and recipe.eval.metrics == ["domain"]
    trainer = Trainer(recipe, tmp_path / "run")
    assert "no built-in metric and neither eval.reference nor eval.clip is set: no final evaluation" \
        in capsys.readouterr().out
    trainer.run()
    assert (tmp_path / "run" / "train_summary.json").exists() and not (tmp_path / "run" / "metrics.json").exists()
    assert load_run(tmp_path / "run").recipe.eval.at_end is False  # the recipe.yaml says what was done
    with pytest.raises(RecipeError, match=r"eval.metrics \['fid'\] needs a reference for teacher 'sd'"):
        Trainer(load_recipe(None, ["train.iterations=1", "eval.metrics=[fid]"], data=data), tmp_path / "run2",
                quiet=True)


def test_an_sd_run_with_a_clip_model_scores_clip_at_the_end(tiny_sd_folder, tmp_path, capsys):
    """With eval.clip naming a CLIP model, an sd teacher's default evaluation is CLIP score of student and teacher
    samples against their prompts (said at the start); the number is clip_score on the same samples and prompts. A
    missing CLIP folder, or clip for a teacher without prompts, is refused before training."""
    import pytest
    from conftest import make_tiny_clip_folder

    from stepdistill.errors import RecipeError
    from stepdistill.eval.clip import clip_score
    from stepdistill.eval.harness import generate_student
    from stepdistill.eval.images import as_uint8

    clip = make_tiny_clip_folder(tmp_path / "clip", image_size=16)
    data = {"teacher": {"name": "sd", "path": str(tiny_sd_folder), "prompts": str(tmp_path / "prompts.txt")},
            "objective": {"name": "vsd"}}
    recipe = load_recipe(None, ["train.iterations=1", "train.batch_size=2", "eval.n=6", "eval.teacher_nfe=2",
                                f"eval.clip={clip}"], data=data)
    Trainer(recipe, tmp_path / "run").run()
    assert f"the final evaluation scores clip (with eval.clip {clip})" in capsys.readouterr().out
    metrics = __import__("json").loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["protocol"]["clip_model"].startswith("clip (weights sha256 ")
    run = load_run(tmp_path / "run")
    images = as_uint8(run.teacher.decode(generate_student(run.student, run.teacher, 6, 0, 1000)))
    want = clip_score(images, run.teacher.eval_prompt_list(6), clip)
    assert metrics["student"]["clip_score"] == pytest.approx(want, abs=1e-4)
    assert metrics["teacher"]["clip_score"] > 0
    with pytest.raises(FileNotFoundError, match="no CLIP model at"):
        Trainer(load_recipe(None, ["train.iterations=1", f"eval.clip={tmp_path / 'nothing'}"], data=data),
                tmp_path / "run2", quiet=True)
    with pytest.raises(RecipeError, match="CLIP score needs a text-to-image teacher"):
        gmm = {"teacher": {"name": "gmm"}, "objective": {"name": "vsd"}}
        Trainer(load_recipe(None, ["train.iterations=1", "eval.metrics=[clip]", f"eval.clip={clip}"], data=gmm),
                tmp_path / "run3", quiet=True)
