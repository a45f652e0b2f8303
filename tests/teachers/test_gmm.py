import pytest
import torch

from stepdistill.recipe import load_recipe
from stepdistill.teachers.gmm import GMMConfig, GMMTeacher


def _log_density(teacher, x, t):
    """log p_t(x) of the noised mixture, by direct summation (independent of the denoiser's formula)."""
    d = teacher.denoiser
    alpha, sigma = d.schedule.alpha_sigma(t)
    var = alpha[:, None] ** 2 * d.std ** 2 + sigma[:, None] ** 2
    diff = x[:, None, :] - alpha[:, None, None] * d.means[None]
    logp = d.log_w[None] - 0.5 * (diff ** 2).sum(-1) / var - 0.5 * x.shape[1] * torch.log(2 * torch.pi * var)
    return torch.logsumexp(logp, dim=1)


@pytest.mark.parametrize("schedule", ["edm", "flow", "trigflow"])
def test_exact_denoiser_is_tweedie(schedule):
    """E[x0|x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha: the denoiser matches autograd of the density."""
    teacher = GMMTeacher(GMMConfig(means=[[0.0, 2.0, 1.0], [2.0, 0.0, -1.0]], weights=[0.3, 0.7], std=0.3,
                                   schedule=schedule))
    x = torch.randn(64, 3, dtype=torch.float64) * 2
    t = torch.rand(64) * 0.9 + 0.05
    x.requires_grad_(True)
    grad, = torch.autograd.grad(_log_density(teacher, x, t).sum(), x)
    alpha, sigma = teacher.denoiser.schedule.alpha_sigma(t)
    expected = (x + sigma[:, None].double() ** 2 * grad) / alpha[:, None].double()
    torch.testing.assert_close(teacher.score(x.detach().float(), t).x0.double(), expected.detach(), atol=2e-4,
                               rtol=1e-4)


def test_recipe_overrides_set_means_weights_std():
    r = load_recipe("configs/toy/gmm_vsd.yaml", ["teacher.means=[[0,2],[2,0]]", "teacher.weights=[1,3]",
                                                 "teacher.std=0.5"])
    teacher = GMMTeacher(r.teacher)
    assert teacher.denoiser.means.tolist() == [[0.0, 2.0], [2.0, 0.0]]
    torch.testing.assert_close(teacher.denoiser.log_w.exp(), torch.tensor([0.25, 0.75]))
    x = teacher.sample(20000, torch.Generator().manual_seed(0))
    assert abs(float((x[:, 0] > 1).float().mean()) - 0.75) < 0.02


def test_bad_mixture_is_rejected():
    with pytest.raises(ValueError, match="teacher.weights"):
        GMMTeacher(GMMConfig(means=[[0.0], [1.0]], weights=[1.0]))
    with pytest.raises(ValueError, match="teacher.std"):
        GMMTeacher(GMMConfig(std=-1))


def test_conditional_denoiser_is_each_components_posterior_mean_and_null_is_the_mixture():
    means = [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]]
    teacher = GMMTeacher(GMMConfig(means=means, std=0.3, conditional=True))
    plain = GMMTeacher(GMMConfig(means=means, std=0.3))
    assert teacher.num_classes == 3 and teacher.score.null_label == 3 and plain.num_classes is None
    x, t = torch.randn(30, 2) * 2, torch.rand(30) * 0.9 + 0.05
    cond = torch.arange(30) % 3
    alpha, sigma = teacher.denoiser.schedule.alpha_sigma(t)
    a, s, mu = alpha[:, None].double(), sigma[:, None].double(), torch.tensor(means, dtype=torch.float64)[cond]
    closed = mu + a * 0.09 / (a * a * 0.09 + s * s) * (x.double() - a * mu)  # one Gaussian's E[x0 | x_t]
    torch.testing.assert_close(teacher.score(x, t, cond).x0.double(), closed, atol=1e-5, rtol=1e-5)
    null = teacher.score.null(cond)
    torch.testing.assert_close(teacher.score(x, t, null).x0, plain.score(x, t).x0)
    torch.testing.assert_close(teacher.score(x, t, None).x0, plain.score(x, t).x0)
    # students start as exact copies of the conditional teacher (the label embedding feeds a zero output layer)
    torch.testing.assert_close(teacher.student_network()(x, t, cond).x0, teacher.score(x, t, cond).x0)


def test_conditional_real_data_respects_labels():
    teacher = GMMTeacher(GMMConfig(conditional=True))
    cond = torch.tensor([0, 1, 2, 3] * 500)
    x = teacher.real_data().sample(len(cond), cond)
    means = teacher.denoiser.means
    assert (x - means[cond]).norm(dim=1).max() < 1.5  # std 0.2, modes 2.8 apart: every sample near its own mean
    assert teacher.sample_cond(1000, classes=[2, 3]).unique().tolist() == [2, 3]
    with pytest.raises(ValueError, match="teacher.weights must be equal"):
        GMMTeacher(GMMConfig(conditional=True, weights=[1, 2, 1, 1]))
