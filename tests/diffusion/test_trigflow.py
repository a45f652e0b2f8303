"""TrigFlow conversion of every schedule, checked against an exact mixture denoiser written in TrigFlow itself."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

from stepdistill.diffusion.schedules import EDM, RectifiedFlow, TrigFlow, VPDiscrete
from stepdistill.diffusion.trigflow import trigflow_noise, trigflow_time, trigflow_velocity
from stepdistill.teachers.gmm import GMMDenoiser, _Exact

SIGMA_D = 0.5
SCHEDULES = {
    "vp-linear": lambda: VPDiscrete.from_diffusers(DDPMScheduler()),
    "vp-cosine": lambda: VPDiscrete.from_diffusers(DDPMScheduler(beta_schedule="squaredcos_cap_v2")),
    "edm": EDM,
    "flow": RectifiedFlow,
    "trigflow": lambda: TrigFlow(0.8),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_t_of_logsnr_inverts_alpha_sigma(name):
    schedule = SCHEDULES[name]()
    t = torch.linspace(0.02, 0.98, 49)
    alpha, sigma = schedule.alpha_sigma(t)
    log_snr = 2 * (alpha.double().log() - sigma.double().log())
    torch.testing.assert_close(schedule.t_of_logsnr(log_snr).float(), t, atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_trigflow_input_has_the_angle_snr(name):
    """The matched time and scale put a TrigFlow state exactly where the teacher expects it: c cos = alpha_t and
    c sigma_d sin = sigma_t."""
    schedule = SCHEDULES[name]()
    theta = torch.linspace(0.1, 1.45, 28)
    t, c = trigflow_time(schedule, theta, SIGMA_D)
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(c * theta.cos(), alpha, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(c * SIGMA_D * theta.sin(), sigma, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("name", SCHEDULES)
def test_x0_implied_by_the_trigflow_velocity_is_the_exact_x0(name):
    """A teacher on any schedule, seen through its TrigFlow F, denoises exactly like the same mixture's exact
    denoiser written in TrigFlow: x0 = cos x - sin sigma_d F."""
    means, weights = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]]), torch.tensor([0.2, 0.3, 0.5])
    schedule = SCHEDULES[name]()
    teacher = _Exact(GMMDenoiser(means, weights, 0.2, schedule), schedule, "x0")
    reference = GMMDenoiser(means, weights, 0.2, TrigFlow(SIGMA_D))
    torch.manual_seed(0)
    theta = torch.linspace(0.05, 1.5, 64)
    x = trigflow_noise(reference.means[torch.randint(0, 3, (64,))], torch.randn(64, 2), theta, SIGMA_D)
    f = trigflow_velocity(teacher, x, theta, None, SIGMA_D)
    x0 = theta.cos()[:, None] * x - theta.sin()[:, None] * SIGMA_D * f
    expected = reference(x, theta / (math.pi / 2)).x0
    torch.testing.assert_close(x0, expected, atol=2e-3, rtol=1e-3)
