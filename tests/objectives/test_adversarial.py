"""LADD's discriminator on a frozen teacher's features, sCM + LADD, TBCM's trajectory pairs and ASD's n vs n+1 step
game: the pieces behave as their papers describe, and misconfigurations say what to change."""
import math

import pytest
import torch
from torch import nn

from stepdistill.diffusion.trigflow import TrigFlowSpace
from stepdistill.models.discriminator import TeacherFeatureDiscriminator, feature_levels
from stepdistill.objectives.tbcm import route, scm_route
from stepdistill.recipe import RecipeError, load_recipe
from stepdistill.teachers import build_teacher
from stepdistill.training.trainer import build


def _unet_teacher(folder):
    return build_teacher(load_recipe(None, ["teacher.name=diffusers", f"teacher.path={folder}",
                                            "objective.name=ladd"], data={"teacher": {}, "objective": {}}).teacher)


def test_ladd_heads_read_every_down_block_and_the_mid_block_of_a_frozen_teacher(tiny_unet_folder):
    teacher = _unet_teacher(tiny_unet_folder)
    disc = TeacherFeatureDiscriminator(teacher.score)
    net = teacher.score.net
    assert [tap.module for tap in feature_levels(teacher.score)] == [*net.down_blocks, net.mid_block]
    # only the heads are the discriminator's: the teacher is neither trained nor saved with it
    assert {n.split(".")[0] for n in disc.state_dict()} == {"heads"}
    assert sum(p.numel() for p in disc.parameters()) == sum(p.numel() for p in disc.heads.parameters())
    x = torch.randn(5, 1, 8, 8, requires_grad=True)
    logits = disc(x, torch.full((5,), 0.5), torch.tensor([0, 1, 2, 0, 1]))
    assert logits.shape == (5, len(disc.heads))
    logits.sum().backward()  # the generator's gradient reaches its sample through the frozen teacher
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.score.parameters())


def test_ladd_hinge_game_trains_heads_and_pulls_the_generator(gmm_built):
    b = gmm_built("objective.name=ladd")
    gen_phase, d_phase = b.objective.phases(0)
    assert (gen_phase.networks, d_phase.networks) == (("generator",), ("discriminator",))
    torch.manual_seed(0)
    batch = b.batch(64)
    out = gen_phase.loss(batch, None)
    d = d_phase.loss(batch, out.samples)
    # hinge at initialisation: heads output about 0, so the loss is about 1 and the game is balanced
    assert 0.5 < d.loss.item() < 1.5 and 0.0 <= d.logs["gan/d_accuracy"] <= 1.0


def test_scm_with_adv_weight_alternates_generator_and_discriminator(gmm_built):
    b = gmm_built("objective.name=scm", "objective.adv_weight=0.5")
    assert [p.networks for p in b.objective.phases(0)] == [("generator",), ("discriminator",)]
    assert isinstance(b.nets.discriminator, TeacherFeatureDiscriminator) and b.nets.fake_score is None
    torch.manual_seed(0)
    out = b.objective.generator_loss(b.batch(32))
    assert {"loss/scm", "loss/generator_adv"} <= set(out.logs)
    logs = {k: float(v) for k, v in out.logs.items()}
    assert logs["loss/generator"] == pytest.approx(logs["loss/scm"] + 0.5 * logs["loss/generator_adv"], rel=1e-5)
    assert [p.networks for p in gmm_built("objective.name=scm").objective.phases(0)] == [("generator",)]


def test_tbcm_route_is_the_references():
    """hustvl/TBCM's route at shift 2.5: reference points from u = 1 to the shifted 1/1000 (theta = atan(s / (1 - s))
    in its convention, data scaled by sigma_d: ours with trigflow: sana), point k drawn between reference points k
    and k - 1."""
    theta = route(4000, 16, 2.5, TrigFlowSpace.of("sana", 0.5))
    assert theta.shape == (4000, 16)
    assert torch.allclose(theta[:, 0], torch.full((4000,), math.pi / 2)) and (theta[:, 0] <= math.pi / 2).all()
    assert (theta[:, 1:] < theta[:, :-1]).all() and (theta > 0).all()
    sig = torch.linspace(1000.0, 1000 * 2.5 * 1e-3 / (1 + 1.5e-3), 16, dtype=torch.float64) / 1000
    sig = 2.5 * sig / (1 + 1.5 * sig)
    ref = torch.atan(sig[1:] / (1 - sig[1:]))  # the reference's compute_refer_route, after its first point
    lo, hi = theta[:, 1:].min(0).values.double(), theta[:, 1:].max(0).values.double()
    torch.testing.assert_close(lo, ref, atol=2e-3, rtol=0)  # each point fills its interval
    torch.testing.assert_close(hi, torch.cat([torch.tensor([math.pi / 2], dtype=torch.float64), ref[:-1]]),
                               atol=2e-3, rtol=0)


def test_tbcm_scm_route_draws_one_angle_per_stratum_of_the_scm_proposal():
    torch.manual_seed(0)
    theta = scm_route(4000, 16, -1.0, 1.4, 0.5)
    assert theta.shape == (4000, 16) and torch.allclose(theta[:, 0], torch.full((4000,), math.pi / 2))
    assert (theta[:, 1:] < theta[:, :-1]).all() and (theta > 0).all()
    # the 15 points after the start are, together, distributed as sCM's atan(exp(N(-1, 1.4)) / 0.5): same quartiles
    want = torch.atan(torch.exp(-1.0 + 1.4 * torch.randn(60000)) / 0.5)
    q = torch.tensor([0.25, 0.5, 0.75])
    torch.testing.assert_close(theta[:, 1:].flatten().quantile(q), want.quantile(q), atol=0.02, rtol=0)


def test_tbcm_scm_spacing_trains_after_the_pure_noise_start(gmm_built):
    b = gmm_built("objective.name=tbcm", "objective.route_spacing=scm")
    torch.manual_seed(0)
    x, theta, dxdt, _ = b.objective.training_points(b.batch(15 * 64))
    torch.testing.assert_close(dxdt, 0.5 * b.objective.trig.velocity(b.nets.teacher, x, theta, None))
    assert theta.max() < 1.5707 and theta.min() < 0.1  # no point at pi/2; the last stratum's lies near the data


def test_tbcm_points_lie_on_the_teacher_trajectory_with_its_velocity(gmm_built):
    """Every training point carries the teacher's own velocity there, and the trajectories start as pure noise
    (std sigma_d) and end close to the mixture (the 15-step TrigFlow DDIM run of the exact teacher)."""
    b = gmm_built("objective.name=tbcm", "objective.route_shift=1.0")
    torch.manual_seed(0)
    x, theta, dxdt, cond = b.objective.training_points(b.batch(15 * 64))
    assert x.shape == (15 * 64, 2) and cond is None
    again = 0.5 * b.objective.trig.velocity(b.nets.teacher, x, theta, None)
    torch.testing.assert_close(dxdt, again)
    assert theta.max() < 1.5707  # the start, pure noise, is not a training point
    start = theta > 1.53  # the first interval below it: nearly pure noise
    assert 0.4 < x[start].std() < 0.6
    last = theta < theta.min() + 0.05  # the lowest-noise points sit near the four modes at radius 2 (x data scale)
    assert (x[last].norm(dim=1) / b.objective.trig.data_scale - 2.0).abs().mean() < 0.5


def test_asd_discriminator_sees_n_step_outputs_as_fake_and_n_plus_1_as_real(gmm_built, monkeypatch):
    b = gmm_built("objective.name=asd", "generator.steps=3")
    obj, gen = b.objective, b.nets.generator
    monkeypatch.setattr(obj, "draw_n", lambda: 2)
    batch = b.batch(8)
    torch.manual_seed(5)
    fake, real = obj.gan_pair(batch, None)
    torch.manual_seed(5)
    with torch.no_grad():
        want_fake = gen(torch.randn(8, 2), None, steps=2)
        want_real = gen(torch.randn(8, 2), None, steps=3)
    torch.testing.assert_close(fake, want_fake)
    torch.testing.assert_close(real, want_real)
    out = obj.generator_loss(batch)
    assert "loss/generator_asd" in out.logs and torch.isfinite(out.loss)


@pytest.mark.parametrize("overrides,match", [
    (["objective.name=asd", "generator.steps=1"], "generator.steps >= 2"),
    (["objective.name=asd", "generator.steps=2", "objective.gan_weight=0.1"], "objective.gan_weight=0"),
    (["objective.name=tbcm", "objective.adv_weight=0.5"], "objective.adv_weight=0"),
    (["objective.name=tbcm", "objective.route_points=1"], "route_points must be >= 2"),
    (["objective.name=tbcm", "objective.route_spacing=log"], "choose shift or scm"),
])
def test_misconfigured_objectives_say_what_to_change(gmm_built, overrides, match):
    with pytest.raises((ValueError, RecipeError), match=match):
        gmm_built(*overrides)


def test_ladd_on_a_network_it_cannot_hook_names_the_fallback(monkeypatch):
    from stepdistill.diffusion.schedules import SCHEDULES
    from stepdistill.models.score import ScoreModel
    from stepdistill.teachers.gmm import GMMTeacher

    class Opaque(nn.Module):
        def forward(self, x, t):
            return x

    with pytest.raises(ValueError, match="gan_weight > 0.*adv_weight=0"):
        TeacherFeatureDiscriminator(ScoreModel(Opaque(), SCHEDULES["flow"](), "x0"))
    monkeypatch.setattr(GMMTeacher, "feature_network", lambda self: ScoreModel(Opaque(), self.score.schedule, "x0"))
    with pytest.raises(RecipeError, match="needs a discriminator.*Fallback"):
        build(load_recipe(None, ["objective.name=ladd"], data={"teacher": {"name": "gmm"}, "objective": {}}))
