"""The held-out validation split of Fashion-MNIST: disjoint from what students see as real data, scored on its own."""
import pytest
import torch

from stepdistill.data import fashion

try:
    fashion._root(None)
except FileNotFoundError:
    pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)", allow_module_level=True)


def test_fit_and_val_cut_the_training_set_in_two():
    train, fit, val = fashion.load("train"), fashion.load("fit"), fashion.load("val")
    assert len(fit[0]) == 50_000 and len(val[0]) == fashion.VAL_SIZE == 10_000
    assert torch.equal(torch.cat([fit[0], val[0]]), train[0]) and torch.equal(torch.cat([fit[1], val[1]]), train[1])
    with pytest.raises(ValueError, match="'fit' or 'val'"):
        fashion.load("validation")


def test_the_teachers_real_data_excludes_the_validation_split():
    from stepdistill.recipe import load_recipe
    from stepdistill.teachers import build_teacher

    teacher = build_teacher(load_recipe("configs/fashion/vsd_1step.yaml").teacher)
    assert len(teacher.real_data().x) == 50_000


def test_val_fd_scores_held_out_training_images_near_zero_and_noise_far():
    from stepdistill.eval.domains import fashion_fd

    test_images = fashion.load("test")[0][:5000]
    assert fashion_fd(test_images, split="val") < 0.2  # real images against real images: sampling noise only
    assert fashion_fd(torch.rand(2000, 1, 16, 16) * 2 - 1, split="val") > 50
