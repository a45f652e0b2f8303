"""The bundled text-to-image teacher: a miniature SD pipeline folder that loads like a real one."""
import pytest

from stepdistill.data import fashion
from stepdistill.recipe import load_recipe
from stepdistill.teachers import build_teacher


@pytest.fixture(scope="module")
def teacher():
    recipe = load_recipe(None, data={"teacher": {"name": "fashion-t2i"}, "objective": {"name": "vsd"}})
    return build_teacher(recipe.teacher)


def test_bundled_t2i_teacher_is_a_latent_text_teacher_with_class_prompts(teacher):
    assert teacher.shape == (4, 8, 8) and teacher.score.prediction == "eps" and teacher.domain == "fashion-mnist"
    prompts = teacher.eval_prompt_list(12)
    assert [p.removeprefix("a photo of a ") for p in prompts[:10]] == [c.lower() for c in fashion.CLASS_NAMES]
    assert prompts[10:] == prompts[:2]  # cycled: labels i % 10, as the test set is balanced
    assert len(teacher.prompts) == 50 and teacher.text.count_truncated(teacher.prompts) == 0


def test_its_vae_reconstructs_real_test_images(teacher):
    try:
        x, _ = fashion.load("test")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    x = x[:500]
    recon = teacher.decode(teacher.codec.encode(x))
    assert recon.shape == x.shape
    assert float((recon - x).pow(2).mean()) < 0.02  # on [-1, 1]; checkpoints/README.md gives the measured value
    latents = teacher.codec.encode(fashion.load("train")[0][:2000])
    assert 0.8 < float(latents.std()) < 1.2  # scaling_factor = 1 / std of the training latents
