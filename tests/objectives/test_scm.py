"""sCM's pieces: the tangent is the consistency function's derivative along the teacher's flow, forward-mode JVP
agrees with finite differences (also through a diffusers UNet with attention), the tangent is normalised, and a
network without forward-mode AD falls back with a message."""
import warnings

import pytest
import torch

from stepdistill.objectives.scm import normalized_tangent
from stepdistill.recipe import RecipeError, load_recipe

SD = 0.5


def _perturbed_gmm_scm(gmm_built):
    b = gmm_built("objective.name=scm")
    torch.manual_seed(0)
    with torch.no_grad():  # a student unlike the teacher, so every term of the tangent is non-zero
        for p in b.nets.generator.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return b


def test_tangent_is_cos_times_the_consistency_derivative_along_the_teacher_flow(gmm_built):
    b = _perturbed_gmm_scm(gmm_built)
    obj = b.objective
    x0 = b.batch(16).x0
    theta = torch.linspace(0.2, 1.4, 16)
    x = obj.trig.noise(x0, torch.randn_like(x0), theta)
    cos, sin = theta.cos()[:, None], theta.sin()[:, None]

    def consistency(x_, th):  # f(x, theta) = cos x - sin sigma_d F: the student's one-step denoised estimate (x k)
        return th.cos()[:, None] * x_ - th.sin()[:, None] * SD * obj.student_velocity(x_, th, None)

    with torch.no_grad():
        dxdt = SD * obj.trig.velocity(b.nets.teacher, x, theta, None)
        h = 1e-4
        along_flow = (consistency(x + h * dxdt, theta + h) - consistency(x - h * dxdt, theta - h)) / (2 * h)
    f_minus, df = obj.velocity_and_tangent(x, theta, None, cos * sin * dxdt, theta.cos() * theta.sin())
    g = -cos ** 2 * (SD * f_minus - dxdt) - (cos * sin * x + SD * df)  # the objective's g at r = 1
    torch.testing.assert_close(g, cos * along_flow, rtol=1e-2, atol=1e-2)
    assert g.abs().max() > 1.0


def _compare_modes(obj, x, theta, cond):
    torch.manual_seed(1)
    dx, dtheta = torch.randn_like(x), torch.rand(len(x))
    obj.jvp_mode = "forward"
    f1, d1 = obj.velocity_and_tangent(x, theta, cond, dx, dtheta)
    assert obj.jvp_mode == "forward"  # no fallback happened
    obj.jvp_mode = "finite_difference"
    f2, d2 = obj.velocity_and_tangent(x, theta, cond, dx, dtheta)
    torch.testing.assert_close(f1, f2)
    assert (d1 - d2).abs().max() <= 5e-3 * d1.abs().max()


def test_jvp_agrees_with_finite_differences_on_gmm(gmm_built):
    b = _perturbed_gmm_scm(gmm_built)
    x = torch.randn(32, 2)
    _compare_modes(b.objective, x, torch.linspace(0.05, 1.5, 32), None)


def test_jvp_agrees_with_finite_differences_through_a_unet_with_attention(tiny_unet_folder, tmp_path):
    """Fused attention kernels and group norm on strided tangents lack forward-mode support in PyTorch;
    forward_ad_ready() works around both, so the exact JVP runs through a diffusers UNet."""
    import numpy as np

    from stepdistill.training.trainer import build

    np.savez(tmp_path / "real.npz", x=np.zeros((6, 1, 8, 8), np.float32), labels=np.arange(6) % 3)
    b = build(load_recipe(None, [f"teacher.path={tiny_unet_folder}", f"data.path={tmp_path / 'real.npz'}"],
                          data={"teacher": {"name": "diffusers"}, "objective": {"name": "scm"}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback warning would fail the test
        _compare_modes(b.objective, torch.randn(6, 1, 8, 8), torch.linspace(0.1, 1.5, 6), torch.arange(6) % 3)
    # xformers' kernel has no forward-mode rule either: its processors give way to SDPA for the JVP, then come back
    # (they are never called here, so this runs without xformers or a GPU)
    from diffusers.models.attention_processor import Attention, XFormersAttnProcessor

    net, args = b.nets.generator.net.net, (torch.randn(6, 1, 8, 8), torch.linspace(0.1, 1.5, 6), torch.arange(6) % 3,
                                       torch.randn(6, 1, 8, 8), torch.rand(6))
    b.objective.jvp_mode = "forward"
    sdpa = b.objective.velocity_and_tangent(*args)
    layers = [m for m in net.modules() if isinstance(m, Attention)]
    for m in layers:
        m.set_processor(XFormersAttnProcessor())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for a, c in zip(b.objective.velocity_and_tangent(*args), sdpa):
            torch.testing.assert_close(a, c)
    assert layers and {type(m.processor) for m in layers} == {XFormersAttnProcessor}


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_a_network_without_forward_ad_falls_back_with_a_message(gmm_built):
    b = _perturbed_gmm_scm(gmm_built)
    mlp = b.nets.generator.net.net
    original = mlp.forward
    mlp.forward = lambda x, t: _NoForwardAD.apply(original(x, t))
    obj, x, theta = b.objective, torch.randn(8, 2), torch.linspace(0.2, 1.4, 8)
    dx, dtheta = torch.randn_like(x), torch.rand(8)
    obj.cfg.jvp = "forward"
    with pytest.raises(RuntimeError, match="objective.jvp=finite_difference"):
        obj.velocity_and_tangent(x, theta, None, dx, dtheta)
    obj.cfg.jvp = "auto"
    with pytest.warns(UserWarning, match="falls back to central finite differences"):
        _, d_auto = obj.velocity_and_tangent(x, theta, None, dx, dtheta)
    assert obj.jvp_mode == "finite_difference"
    _, d_fd = obj.velocity_and_tangent(x, theta, None, dx, dtheta)
    torch.testing.assert_close(d_auto, d_fd)


def test_tangent_normalisation_bounds_the_tangent():
    g = torch.randn(5, 3, 4, 4) * torch.tensor([1e-3, 1.0, 10.0, 1e3, 1e6]).reshape(5, 1, 1, 1)
    normed, norms = normalized_tangent(g, 0.1)
    after = normed.flatten(1).norm(dim=1)
    assert (after <= 1).all()
    torch.testing.assert_close(after, norms / (norms + 0.1))
    assert after[-1] > 0.999 and after[0] < 0.1  # large tangents end near unit norm, small ones stay small


def test_unknown_jvp_mode_lists_the_valid_ones():
    with pytest.raises(RecipeError, match="finite_difference"):
        load_recipe(None, ["objective.jvp=reverse"], data={"teacher": {"name": "gmm"}, "objective": {"name": "scm"}})


def test_bf16_leaves_no_rounding_residual_in_the_loss(gmm_built, monkeypatch):
    """The loss is ||F - F^- - g||^2 with F^- = stopgrad(F). Under bf16 autocast the graded pass F is rounded to bf16
    while the JVP's primal is float32; their difference must not enter the loss. With g = 0 the loss is then exactly
    its log-variance term."""
    from stepdistill.objectives import scm

    b = _perturbed_gmm_scm(gmm_built)
    monkeypatch.setattr(scm, "normalized_tangent", lambda g, c: (torch.zeros_like(g), torch.zeros(len(g))))
    torch.manual_seed(0)
    batch = b.batch(64)
    with torch.autocast("cpu", torch.bfloat16):
        out = b.objective.generator_loss(batch)
    assert out.loss.item() == pytest.approx(float(out.logs["scm/logvar"]), abs=1e-7)
