import json
import shutil

import pytest
import torch

from stepdistill.teachers.sd import SDConfig, SDTeacher


def teacher(folder, **kw):
    return SDTeacher(SDConfig(path=str(folder), prompts=str(folder.parent / "prompts.txt"), **kw))


def test_sd_folder_becomes_a_latent_text_teacher(tiny_sd_folder):
    t = teacher(tiny_sd_folder)
    assert t.shape == (4, 8, 8) and t.is_image and t.score.conditioning == "text"
    cond = t.sample_cond(5, torch.Generator().manual_seed(0))
    assert cond.shape == (5, 77, 32)
    # the cached encoding is what the text encoder gives for that prompt, padded to the 77-token context
    ids = t.text.tokenizer(["a blue bag"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.allclose(t.text(["a blue bag"])[0], t.text.encoder(ids)[0][0])
    assert torch.equal(t.score.null_cond, t.text([""]))  # SD1.5's convention: the encoded empty prompt
    assert torch.equal(t.eval_cond(6), t.text(t.eval_prompt_list(6)))
    assert t.eval_prompt_list(6)[4:] == ["a red shirt", "a blue bag"]  # cycled
    images = t.decode(torch.randn(2, 4, 8, 8))
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    # CFG uses the null embedding: guided at scale 1 is the plain prediction, at 3 it differs
    x, tt = torch.randn(5, 4, 8, 8), torch.full((5,), 0.5)
    assert torch.equal(t.score.guided(x, tt, cond, 1.0).x0, t.score(x, tt, cond).x0)
    assert not torch.allclose(t.score.guided(x, tt, cond, 3.0).x0, t.score(x, tt, cond).x0)


def test_zeros_null_and_eval_prompts(tiny_sd_folder):
    (tiny_sd_folder.parent / "eval.jsonl").write_text('{"caption": "a white hat"}\n')
    t = teacher(tiny_sd_folder, null="zeros", eval_prompts=str(tiny_sd_folder.parent / "eval.jsonl"))
    assert torch.count_nonzero(t.score.null_cond) == 0 and t.score.null_cond.shape == (1, 77, 32)
    assert t.eval_prompt_list(2) == ["a white hat"] * 2


def test_bad_sd_inputs_name_the_fix(tiny_sd_folder, tmp_path):
    with pytest.raises(ValueError, match="teacher.prompts is empty"):
        SDTeacher(SDConfig(path=str(tiny_sd_folder)))
    with pytest.warns(UserWarning, match="1 of 2 prompts in teacher.prompts are longer than the text encoder's 77 "
                                         "tokens and are truncated"):
        (tmp_path / "long.txt").write_text("a shirt\n" + "very " * 40 + "long\n")
        SDTeacher(SDConfig(path=str(tiny_sd_folder), prompts=str(tmp_path / "long.txt")))
    xl = tmp_path / "xl"
    shutil.copytree(tiny_sd_folder, xl)
    index = json.loads((xl / "model_index.json").read_text())
    (xl / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(ValueError, match=r"PixArtSigmaPipeline folder, which teacher sd does not support yet "
                                         r"\(PixArt-Sigma support is planned\); supported: StableDiffusionPipeline"):
        teacher(xl)
    (xl / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        teacher(xl)
    with pytest.raises(ValueError, match="unknown null condition 'none'"):
        teacher(tiny_sd_folder, null="none")
    from stepdistill.teachers.diffusers_teacher import DiffusersConfig, DiffusersTeacher

    with pytest.raises(ValueError, match="is a text-to-image .latent. pipeline, not a pixel-space UNet: use "
                                         "teacher.name: sd"):  # not an AttributeError at the first step
        DiffusersTeacher(DiffusersConfig(path=str(tiny_sd_folder)))


@pytest.mark.parametrize("prediction_type, kind", [("epsilon", "eps"), ("v_prediction", "v")])
def test_x0_matches_the_pipelines_own_scheduler(tmp_path, prediction_type, kind):
    """SD1.5 (eps) and SD2.1-768 (v) folders: the canonical x0 equals what the folder's DDPM scheduler computes from
    the same UNet output (pred_original_sample)."""
    from conftest import make_tiny_sd_folder
    from diffusers import DDPMScheduler

    folder = make_tiny_sd_folder(tmp_path / "sd", prediction_type=prediction_type)
    (tmp_path / "prompts.txt").write_text("a shirt\n")
    t = SDTeacher(SDConfig(path=str(folder), prompts=str(tmp_path / "prompts.txt")))
    assert t.score.prediction == kind
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    x, cond = torch.randn(2, 4, 8, 8), t.sample_cond(2)
    for timestep in (999, 500, 20):
        canonical = torch.full((2,), timestep / 999)
        with torch.no_grad():
            out = t.score.net(x, timestep, encoder_hidden_states=cond).sample
            expected = scheduler.step(out, timestep, x).pred_original_sample
            torch.testing.assert_close(t.score(x, canonical, cond).x0, expected, rtol=1e-4, atol=1e-4)
