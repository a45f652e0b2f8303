"""sCM, LADD and TBCM follow SANA-Sprint's TrigFlow convention (NVlabs/Sana train_scripts/train_scm_ladd.py,
hustvl/TBCM train_scripts/train_tbcm.py): latents scaled by sigma_d, so SANA's p_mean, p_std, d_p_mean and TBCM's
route mean what they say there. Closed forms worked out from the references' code."""
import math

import torch

from stepdistill.diffusion.trigflow import TrigFlowSpace
from stepdistill.objectives.ladd import renoised
from stepdistill.objectives.tbcm import route

SD = 0.5


def _recording_teacher(b):
    """Record the canonical times the (flow) teacher is evaluated at."""
    seen, guided = [], b.nets.teacher.guided

    def spy(x, t, *args, **kwargs):
        seen.append(t.detach().clone())
        return guided(x, t, *args, **kwargs)

    b.nets.teacher.guided = spy
    return seen


def test_scm_default_angles_put_the_flow_teacher_at_sanas_median_time(gmm_built):
    """SANA's logit_normal_trigflow draws theta = atan(exp(N(0.2, 1.6)) / 0.5) on latents scaled by 0.5: the median
    noise-to-signal ratio of the latents is tan(theta) = exp(0.2) / 0.5 = 2.443, flow time 2.443 / 3.443 = 0.7095
    (the unscaled convention read the same angle as exp(0.2) = 1.221, flow time 0.5498)."""
    b = gmm_built("objective.name=scm")
    obj = b.objective
    assert (obj.cfg.p_mean, obj.cfg.p_std, obj.cfg.trigflow) == (0.2, 1.6, "sana")
    torch.manual_seed(0)
    theta = obj.sample_theta(200_000)
    ratio = math.exp(0.2) / SD
    assert abs(theta.median().item() - math.atan(ratio)) < 0.01
    seen = _recording_teacher(b)
    obj.sample_theta = lambda n: torch.full((n,), math.atan(ratio))
    obj.training_points(b.batch(8))
    torch.testing.assert_close(seen[0], torch.full((8,), ratio / (1 + ratio)))


def test_ladd_median_renoising_is_sanas_median_discriminator_time(gmm_built):
    """SANA's discriminator times atan(exp(N(-0.6, 1)) / 0.5) on latents scaled by 0.5: at the median the latents'
    noise-to-signal ratio is exp(-0.6) / 0.5 = 1.0976, flow time 0.5233 = sin / (sin + cos) of that angle (log-SNR =
    -2 n read it as exp(-0.6) = 0.549, flow time 0.354)."""
    b = gmm_built("objective.name=ladd")
    x0 = torch.zeros(16, 2)
    _, t = renoised(b.objective, x0, -0.6, 0.0)
    theta_d = torch.tensor(math.atan(math.exp(-0.6) / 0.5))
    expected = theta_d.sin() / (theta_d.sin() + theta_d.cos())
    torch.testing.assert_close(t, expected.expand(16))
    assert abs(expected.item() - 0.5233) < 1e-4


def test_tbcm_route_is_the_references_in_sanas_convention():
    """hustvl/TBCM compute_refer_route: reference angles atan(s / (1 - s)) at the shifted flow times, no sigma_d (its
    latents are scaled by sigma_d = 0.5); point k between reference points k and k - 1. And each angle puts the
    flow teacher back at the flow time s it came from."""
    trig = TrigFlowSpace.of("sana", SD)
    torch.manual_seed(0)
    theta = route(4000, 16, 2.5, trig)
    sig = torch.linspace(1000.0, 1000 * 2.5 * 1e-3 / (1 + 1.5e-3), 16, dtype=torch.float64) / 1000
    sig = 2.5 * sig / (1 + 1.5 * sig)
    ref = torch.atan(sig[1:] / (1 - sig[1:]))
    lo, hi = theta[:, 1:].min(0).values.double(), theta[:, 1:].max(0).values.double()
    torch.testing.assert_close(lo, ref, atol=2e-3, rtol=0)
    torch.testing.assert_close(hi, torch.cat([torch.tensor([math.pi / 2], dtype=torch.float64), ref[:-1]]),
                               atol=2e-3, rtol=0)
    from stepdistill.diffusion.schedules import RectifiedFlow

    t, _ = trig.time(RectifiedFlow(), ref.float())
    torch.testing.assert_close(t, sig[1:].float(), atol=1e-5, rtol=0)


def _sana_velocity(score, x_in, theta):
    """SanaMSCM.forward on a flow-matching ScoreModel: input x_in = state / sigma_d."""
    c = theta.reshape(-1, *[1] * (x_in.ndim - 1))
    s = c.sin() / (c.sin() + c.cos())
    norm = torch.sqrt(s ** 2 + (1 - s) ** 2)
    x_s = x_in * norm
    pred = score(x_s, s.flatten())
    v = pred.eps - pred.x0  # the flow net's output
    return ((1 - 2 * s) * x_s + (1 - 2 * s + 2 * s ** 2) * v) / norm


def test_scm_loss_is_sanas_on_sigma_d_scaled_data(gmm_built):
    """The generator loss equals train_scm_ladd.py's G phase written out with SanaMSCM's conversion on latents scaled
    by sigma_d: x_t = cos (sigma_d x0) + sin (sigma_d z), dxt_dt = sigma_d F_teacher(x_t / sigma_d), the JVP along
    (cos sin dxt_dt / sigma_d, cos sin), g, its normalisation, and the weight 1 / (sigma_d tan t). The student's
    x0 prediction is the consistency function (cos x_t - sin sigma_d F) / sigma_d."""
    b = gmm_built("objective.name=scm", "objective.adaptive_weight=false")
    obj, teacher, student = b.objective, b.nets.teacher, b.nets.generator.net
    torch.manual_seed(0)
    with torch.no_grad():
        for p in b.nets.generator.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x0 = b.batch(32).x0
    t = torch.linspace(0.1, 1.45, 32)
    c, s = t.cos()[:, None], t.sin()[:, None]
    x_t = c * (SD * x0) + s * (SD * torch.randn_like(x0))
    with torch.no_grad():
        dxt_dt = SD * _sana_velocity(teacher, x_t / SD, t)
        f_minus, df = torch.func.jvp(lambda xin, tt: _sana_velocity(student, xin, tt), (x_t / SD, t),
                                     (c * s * dxt_dt / SD, c[:, 0] * s[:, 0]))
    r = 0.7
    g = -c * c * (SD * f_minus - dxt_dt) - r * (c * s * x_t + SD * df)
    g = g / (g.norm(dim=1, keepdim=True) + 0.1)
    expected = (1 / (SD * torch.tan(t))[:, None] * g ** 2).mean()

    obj.r = r
    obj.training_points = lambda batch: (x_t, t, dxt_dt, None)
    out = obj.generator_loss(b.batch(32))
    torch.testing.assert_close(out.loss, expected, rtol=2e-3, atol=1e-6)
    with torch.no_grad():  # the student samples as an ordinary generator: its x0 is the consistency estimate
        x0_student = (c * x_t - s * SD * f_minus) / SD
        tf, scale = obj.trig.time(student.schedule, t)
        torch.testing.assert_close(x0_student, student(scale[:, None] * x_t, tf).x0, atol=1e-4, rtol=1e-4)
