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


def test_its_real_data_are_latents_of_the_class_each_prompt_names(teacher, monkeypatch):
    """DMD2's GAN term on this teacher draws real latents by the class the condition's prompt names."""
    import torch

    from stepdistill.errors import InputError

    x = torch.linspace(-1, 1, 40).view(40, 1, 1, 1).expand(40, 1, 16, 16).contiguous()  # 40 distinct images
    labels = torch.arange(40) % 10
    monkeypatch.setattr(fashion, "load", lambda split: (x, labels) if split == "fit" else pytest.fail(split))
    monkeypatch.setattr(teacher, "_data", None)
    data = teacher.real_data()
    latents = teacher.codec.encode(x)
    prompts = [teacher.prompts[i] for i in (0, 13, 27, 49, 5)]  # the first template of class 0, then others
    classes = torch.tensor([next(c for c in range(10) if p.endswith(" " + fashion.CLASS_NAMES[c].lower()))
                            for p in prompts])
    torch.manual_seed(0)
    drawn = data.sample(5 * 8, teacher.text(prompts * 8))
    owner = torch.cdist(drawn.flatten(1), latents.flatten(1)).argmin(dim=1)  # which image each draw encodes
    assert torch.equal(labels[owner], classes.repeat(8))
    assert len(set(owner.tolist())) > 5  # drawn from each class's pool, not one image per class
    with pytest.raises(InputError, match="match none of the teacher's prompts"):
        data.sample(2, teacher.text(["a photo of a spaceship", prompts[0]]))
