"""Schedules and parametrisations against diffusers' own scheduler maths, and conversion round trips."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

from stepdistill.diffusion.parametrization import KINDS, Prediction, from_prediction, to_prediction
from stepdistill.diffusion.schedules import EDM, RectifiedFlow, TrigFlow, VPDiscrete
from stepdistill.diffusion.timesteps import step_times, uniform_t

SCHEDULES = {
    "vp-linear": VPDiscrete.from_diffusers(DDPMScheduler()),
    "vp-cosine": VPDiscrete.from_diffusers(DDPMScheduler(beta_schedule="squaredcos_cap_v2")),
    "edm": EDM(),
    "flow": RectifiedFlow(),
    "trigflow": TrigFlow(),
}


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_vp_add_noise_matches_diffusers(beta_schedule):
    sched = DDPMScheduler(beta_schedule=beta_schedule)
    ours = VPDiscrete.from_diffusers(sched)
    x0, eps = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    tau = torch.tensor([0, 1, 250, 500, 998, 999])
    expected = sched.add_noise(x0, eps, tau)
    got = ours.add_noise(x0, eps, tau / 999)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.native(tau / 999).round().long(), tau)


@pytest.mark.parametrize("prediction_type,kind", [("epsilon", "eps"), ("v_prediction", "v"), ("sample", "x0")])
def test_vp_x0_matches_ddim_step(prediction_type, kind):
    """Our conversion of a network output to x0 equals DDIM's predicted_original_sample."""
    sched = DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False)
    sched.set_timesteps(10)
    ours = VPDiscrete.from_diffusers(sched)
    x_t, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = int(sched.timesteps[3])
    ref = sched.step(out, t, x_t).pred_original_sample
    alpha, sigma = ours.alpha_sigma(torch.full((2,), t / 999))
    torch.testing.assert_close(to_prediction(kind, out, x_t, alpha, sigma).x0, ref, atol=1e-4, rtol=1e-4)


def test_flow_matches_diffusers_scale_noise():
    sched = FlowMatchEulerDiscreteScheduler()
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    sched.set_timesteps(10)
    ts = sched.timesteps[[0, 4, 9]]
    expected = torch.cat([sched.scale_noise(x0[i:i + 1], ts[i:i + 1], eps[i:i + 1]) for i in range(3)])
    got = RectifiedFlow().add_noise(x0, eps, ts / 1000)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_flow_euler_step_matches_diffusers():
    """One Euler step of diffusers' flow scheduler equals a DDIM step with our flow conversion."""
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(5)
    x_t, u = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    t, t_next = sched.sigmas[1], sched.sigmas[2]
    ref = sched.step(u, sched.timesteps[1], x_t).prev_sample
    sch = RectifiedFlow()
    a, s = sch.alpha_sigma(t.reshape(1))
    pred = to_prediction("flow", u, x_t, a, s)
    got = sch.add_noise(pred.x0, pred.eps, t_next.reshape(1))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("kind", KINDS)
def test_conversion_round_trip(name, kind):
    sch = SCHEDULES[name]
    if kind == "flow" and name != "flow":
        pytest.skip("flow velocity is defined for rectified-flow schedules (alpha + sigma = 1)")
    t = torch.tensor([0.05, 0.3, 0.6, 0.9])
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    alpha, sigma = sch.alpha_sigma(t)
    x_t = sch.add_noise(x0, eps, t)
    out = from_prediction(kind, Prediction(x0, eps), alpha, sigma)
    back = to_prediction(kind, out, x_t, alpha, sigma)
    torch.testing.assert_close(back.x0, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(back.eps, eps, atol=1e-4, rtol=1e-4)


def test_vp_is_variance_preserving_and_monotone():
    sch = SCHEDULES["vp-cosine"]
    t = torch.linspace(0, 1, 1001)
    a, s = sch.alpha_sigma(t)
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(a))
    assert (a[1:] <= a[:-1] + 1e-7).all()


def test_trigflow_and_edm_definitions():
    t = torch.tensor([0.0, 0.5, 1.0])
    a, s = TrigFlow(0.5).alpha_sigma(t)
    torch.testing.assert_close(a, torch.cos(t * math.pi / 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(s, 0.5 * torch.sin(t * math.pi / 2), atol=1e-6, rtol=0)
    _, s = EDM().alpha_sigma(t)
    assert abs(float(s[0]) - 0.002) < 1e-6 and abs(float(s[-1]) - 80.0) < 1e-3


def test_step_times_match_lcm_scheduler():
    """Our K-step generator times are the ones LCMScheduler picks with original_inference_steps=K."""
    vp = SCHEDULES["vp-cosine"]
    for k in (1, 2, 4):
        sched = LCMScheduler(beta_schedule="squaredcos_cap_v2", original_inference_steps=k)
        sched.set_timesteps(k)
        assert [round(t * 999) for t in step_times(k, vp)] == sched.timesteps.tolist()


def test_uniform_t_snaps_to_integers_for_discrete_schedules():
    t = uniform_t(1000, 0.02, 0.98, SCHEDULES["vp-linear"])
    tau = t.double() * 999
    assert torch.allclose(tau, tau.round(), atol=1e-3)
    assert tau.min() >= 19.5 and tau.max() <= 979.5
    with pytest.raises(ValueError, match="t_min"):
        uniform_t(4, 0.5, 0.1, SCHEDULES["edm"])
