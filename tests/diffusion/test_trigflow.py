"""TrigFlow conversion of every schedule, checked against an exact mixture denoiser written in TrigFlow itself, in
both conventions (SANA-Sprint's data scaled by sigma_d, Lu & Song's unscaled pixels), and against SANA-Sprint's own
flow-matching conversion (NVlabs/Sana SanaMSCM.forward)."""
import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from stepdistill.diffusion.schedules import EDM, RectifiedFlow, TrigFlow, VPDiscrete
from stepdistill.diffusion.trigflow import TrigFlowSpace
from stepdistill.models.score import ScoreModel
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


@pytest.mark.parametrize("convention", ["sana", "scm"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_trigflow_input_has_the_angle_snr(name, convention):
    """The matched time and scale put a TrigFlow state exactly where the teacher expects it: c k cos = alpha_t and
    c sigma_d sin = sigma_t (k = sigma_d for sana, 1 for scm)."""
    schedule, trig = SCHEDULES[name](), TrigFlowSpace.of(convention, SIGMA_D)
    theta = torch.linspace(0.1, 1.45, 28)
    t, c = trig.time(schedule, theta)
    alpha, sigma = schedule.alpha_sigma(t)
    k = SIGMA_D if convention == "sana" else 1.0
    torch.testing.assert_close(c * k * theta.cos(), alpha, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(c * SIGMA_D * theta.sin(), sigma, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("sigma_d", [0.3, 0.5, 1.0])
def test_sana_convention_puts_a_quarter_turn_at_flow_time_one_half_whatever_sigma_d(sigma_d):
    """SANA-Sprint scales the data by sigma_d, so sigma/alpha = tan(theta): a rectified-flow teacher sits at flow
    time s = sin / (sin + cos) (SanaMSCM.forward), 1/2 at theta = pi/4. Lu & Song's unscaled convention puts
    theta = pi/4 at sigma/alpha = sigma_d, flow time sigma_d / (1 + sigma_d) (1/3 at sigma_d = 0.5)."""
    theta = torch.tensor([math.pi / 4, 0.3, 1.2])
    t, _ = TrigFlowSpace.of("sana", sigma_d).time(RectifiedFlow(), theta)
    torch.testing.assert_close(t[0], torch.tensor(0.5))
    torch.testing.assert_close(t, (theta.sin() / (theta.sin() + theta.cos())).float())
    t_scm, _ = TrigFlowSpace.of("scm", sigma_d).time(RectifiedFlow(), theta[:1])
    torch.testing.assert_close(t_scm[0], torch.tensor(sigma_d / (1 + sigma_d)))


class _ToyFlowNet(nn.Module):
    """Some smooth velocity v(x_s, timestep) of a flow-matching net with diffusers' timestep = 1000 s."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.3))

    def forward(self, x, timestep):
        s = timestep[:, None] / 1000
        return torch.sin(self.w * x + s) - 0.7 * x * s + torch.flip(x, dims=[1])


def test_velocity_of_a_flow_teacher_is_sanas_fm_to_trigflow_conversion():
    """NVlabs/Sana SanaMSCM.forward, written out: s = sin / (sin + cos), the flow net reads x_s = (x / sigma_d)
    sqrt(s^2 + (1-s)^2) at timestep 1000 s, and F = [(1 - 2s) x_s + (1 - 2s + 2 s^2) v] / sqrt(s^2 + (1-s)^2). The
    state x holds latents scaled by sigma_d, the teacher's dx/dtheta = sigma_d F."""
    net, sd = _ToyFlowNet(), 0.5
    teacher = ScoreModel(net, RectifiedFlow(), "flow")
    torch.manual_seed(0)
    theta = torch.linspace(0.05, 1.5, 32)
    x = torch.randn(32, 3) * sd
    s = (theta.sin() / (theta.sin() + theta.cos()))[:, None]
    norm = torch.sqrt(s ** 2 + (1 - s) ** 2)
    x_s = x / sd * norm
    with torch.no_grad():
        v = net(x_s, 1000 * s[:, 0])
    expected = ((1 - 2 * s) * x_s + (1 - 2 * s + 2 * s ** 2) * v) / norm
    f = TrigFlowSpace.of("sana", sd).velocity(teacher, x, theta, None)
    torch.testing.assert_close(f, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("convention", ["sana", "scm"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_x0_implied_by_the_trigflow_velocity_is_the_exact_x0(name, convention):
    """A teacher on any schedule, seen through its TrigFlow F, denoises exactly like the same mixture's exact
    denoiser written in TrigFlow (the mixture scaled by k, k = sigma_d for sana): the consistency function
    (cos x - sin sigma_d F) / k is the data."""
    means, weights = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]]), torch.tensor([0.2, 0.3, 0.5])
    schedule, trig = SCHEDULES[name](), TrigFlowSpace.of(convention, SIGMA_D)
    k = trig.data_scale
    teacher = _Exact(GMMDenoiser(means, weights, 0.2, schedule), schedule, "x0")
    reference = GMMDenoiser(k * means, weights, 0.2 * k, TrigFlow(SIGMA_D))  # the state's own mixture
    torch.manual_seed(0)
    theta = torch.linspace(0.05, 1.5, 64)
    x = trig.noise(means[torch.randint(0, 3, (64,))], torch.randn(64, 2), theta)
    x0 = trig.x0(x, trig.velocity(teacher, x, theta, None), theta)
    expected = reference(x, theta / (math.pi / 2)).x0 / k
    torch.testing.assert_close(x0, expected, atol=2e-3, rtol=1e-3)
    t, c = trig.time(schedule, theta)  # and it is the teacher's own x0 prediction, as the student's will be
    torch.testing.assert_close(x0, teacher(c[:, None] * x, t).x0, atol=1e-4, rtol=1e-4)
