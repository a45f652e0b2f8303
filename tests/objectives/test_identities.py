"""Identities each distribution-matching objective must satisfy (docs/methods.md: vsd, fdiv, sid, disback)."""
import copy

import pytest
import torch

from stepdistill.objectives.base import Batch
from stepdistill.objectives.fdiv import H
from stepdistill.objectives.sid import sid_loss


def _generator_grads(b, loss_fn, seed=0, batch=None):
    torch.manual_seed(seed)
    b.nets.generator.zero_grad(set_to_none=True)
    loss_fn(batch or b.batch(64)).loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in b.nets.generator.parameters()]


def _make_fake_the_teacher(b):
    """Fake score and teacher become the same function (the teacher a frozen copy of the fake score)."""
    with torch.no_grad():
        for p in b.nets.fake_score.parameters():
            p.add_(0.05 * torch.randn_like(p))  # away from the gmm teacher, so nothing vanishes by accident
    b.nets.teacher = copy.deepcopy(b.nets.fake_score).requires_grad_(False)


@pytest.mark.parametrize("name,extra", [("vsd", []), ("vsd", ["objective.guidance_range=[1.0,3.0]"]),
                                        ("fdiv", ["objective.divergence=js"]), ("sid", []),
                                        ("sid", ["objective.alpha=1.0"])])
def test_generator_gradient_vanishes_when_fake_score_equals_teacher(name, extra, gmm_built):
    """Exactly zero for the pseudo-target losses; for SiD, whose gradient is a difference of two backward passes
    through the same function, zero up to float rounding (a millionth of the gradient when they differ)."""
    b = gmm_built(f"objective.name={name}", *extra)
    if name == "fdiv":  # the identity is the distribution-matching term's; fdiv's recipe refuses gan_weight 0
        b.objective.cfg.gan_weight = 0.0
    _make_fake_the_teacher(b)
    b.objective.phases(0)
    equal = max(float(g.abs().max()) for g in _generator_grads(b, b.objective.generator_loss))
    with torch.no_grad():
        for p in b.nets.fake_score.parameters():
            p.add_(0.05 * torch.randn_like(p))
    differ = max(float(g.abs().max()) for g in _generator_grads(b, b.objective.generator_loss))
    assert differ > 0
    assert equal == 0.0 if name != "sid" else equal <= 1e-6 * differ


def test_fdiv_with_reverse_kl_is_exactly_vsd(gmm_built):
    """h = 1 for reverse KL, so f-distill's generator gradient is VSD's, bit for bit (same weights, same draws)."""
    vsd, fdiv = gmm_built("objective.name=vsd"), gmm_built("objective.name=fdiv", "objective.divergence=rkl")
    fdiv.objective.cfg.gan_weight = 0.0  # compare the distribution-matching terms (the recipe requires > 0)
    fdiv.nets.generator.load_state_dict(vsd.nets.generator.state_dict())
    with torch.no_grad():
        for p in vsd.nets.fake_score.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fdiv.nets.fake_score.load_state_dict(vsd.nets.fake_score.state_dict())
    g_vsd = _generator_grads(vsd, vsd.objective.generator_loss, batch=Batch(64))  # no real data: same draws
    g_fdiv = _generator_grads(fdiv, fdiv.objective.generator_loss, batch=Batch(64))
    assert all(torch.equal(a, b) for a, b in zip(g_vsd, g_fdiv))
    assert any(float(a.abs().max()) > 0 for a in g_vsd)


# f(r) of each divergence, D_f(p||q) = E_q f(p/q), written independently of the h table
F_OF_R = {
    "rkl": lambda r: -r.log(),
    "kl": lambda r: r * r.log(),
    "js": lambda r: r * r.log() - (1 + r) * ((1 + r) / 2).log(),
    "sf": lambda r: (r + 1) * ((r + 1) / (2 * r)).log(),
    "neyman": lambda r: (1 - r) ** 2 / r,
    "sh": lambda r: (r.sqrt() - 1) ** 2,
    "jf": lambda r: (r - 1) * r.log(),
}


@pytest.mark.parametrize("div", sorted(H))
def test_each_h_is_r_squared_f_second_derivative(div):
    """h(r) = r^2 f''(r) up to a constant factor (h is normalised by its batch mean, so only its shape matters)."""
    r = torch.logspace(-1, 1.3, 50, dtype=torch.float64).requires_grad_(True)
    f1, = torch.autograd.grad(F_OF_R[div](r).sum(), r, create_graph=True)
    f2, = torch.autograd.grad(f1.sum(), r)
    expected = (r * r * f2).detach()
    h = H[div](r.detach())
    ratio = h / expected
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))
    assert float(ratio[0]) > 0


def test_fdiv_weight_clamps_the_ratio_and_has_unit_batch_mean(gmm_built):
    b = gmm_built("objective.name=fdiv", "objective.divergence=kl", "objective.ratio_bins=0")
    logits = torch.tensor([-50.0, -1.0, 0.0, 1.0, 50.0])
    w = b.objective.weight(logits, torch.rand(5))
    r = torch.tensor([0.1, torch.e ** -1, 1.0, torch.e, 20.0])
    torch.testing.assert_close(w, r / r.mean())
    assert float(w.mean()) == pytest.approx(1.0)


def test_sid_loss_equals_its_closed_form():
    """sum[(y_r - y_f)((y_r - x_g) - alpha (y_r - y_f))] = (1 - alpha)|y_r - y_f|^2 + (y_r - y_f).(y_f - x_g)."""
    g = torch.Generator().manual_seed(0)
    x, yr, yf = (torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for alpha in (0.5, 1.0, 1.2):
        d = (yr - yf).flatten(1)
        expected = (1 - alpha) * (d * d).sum(1) + (d * (yf - x).flatten(1)).sum(1)
        torch.testing.assert_close(sid_loss(x, yr, yf, alpha), expected)


def test_sid_generator_loss_backpropagates_through_teacher_and_fake_score(gmm_built):
    """SiD is not a pseudo-target loss: the graph runs through both networks' inputs (docs/methods.md, sid)."""
    b = gmm_built("objective.name=sid")
    torch.manual_seed(0)
    out = b.objective.generator_loss(b.batch(16))
    names = set()
    stack, seen = [out.loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    assert "SoftmaxBackward0" in names  # the exact gmm teacher's posterior responsibilities are differentiated
    assert "SiluBackward0" in names  # and so are the fake score's MLP layers


def test_sid_guidance_modes_place_the_scales():
    from stepdistill.objectives.sid import SiD, SiDConfig

    def scales(**kw):
        obj = SiD.__new__(SiD)
        obj.cfg = SiDConfig(kappa1=1.5, kappa2=2.0, kappa4=3.0, anti_scale=-0.5, **kw)
        return obj.scales()

    assert scales() == (3.0, 2.0, 1.5)  # (teacher, fake in the generator loss, fake training)
    assert scales(guidance="zero_cfg") == (1.0, 0.0, 1.5)
    assert scales(guidance="anti_cfg") == (3.0, -0.5, 1.5)


def test_snoopi_draws_one_scale_per_iteration_for_teacher_and_fake(gmm_built):
    b = gmm_built("objective.name=vsd", "objective.guidance_range=[2.0,4.0]")
    torch.manual_seed(0)
    drawn = []
    for step in range(20):
        b.objective.phases(step)
        real, fake = b.objective.scales
        assert real == fake and 2.0 <= real <= 4.0
        drawn.append(real)
    assert len(set(drawn)) == 20


def test_snoopi_fake_score_fits_its_plain_prediction(gmm_built, monkeypatch):
    """Under PG-SB the fake score is guided where the generator's gradient reads it, but trained on its plain
    prediction (SwiftBrush's LoRA loss): fitting its guided output at a scale redrawn every iteration would fit none."""
    from stepdistill.models.score import ScoreModel

    b = gmm_built("objective.name=vsd", "objective.guidance_range=[2.0,4.0]", "teacher.conditional=true")
    calls = []
    guided = ScoreModel.guided
    monkeypatch.setattr(ScoreModel, "guided", lambda self, *a: calls.append((self, a[3])) or guided(self, *a))
    torch.manual_seed(0)
    gen_phase, fake_phase = b.objective.phases(0)
    samples = gen_phase.loss(b.batch(64), None).samples
    assert {s for net, s in calls if net is b.nets.fake_score} == {b.objective.scales[1]} != {1.0}  # guided read
    calls.clear()
    fake_phase.loss(b.batch(64), samples)
    assert [s for net, s in calls if net is b.nets.fake_score] == [1.0]  # plain fit


def test_disback_target_walks_back_from_the_degraded_score_to_the_teacher(gmm_built):
    """Stage 1 records a path (the fake score moves away from the teacher); stage 2's target starts one snapshot
    before its end (the end is the fake score itself: no gradient), differs from the teacher, moves back one snapshot
    per backtrack_every iterations, ends at the teacher. The path survives a checkpoint round trip."""
    b = gmm_built("objective.name=disback", "objective.record_iterations=6", "objective.record_every=2",
                  "objective.backtrack_every=3", "train.lr=1e-2", "train.fake_lr=1e-2")
    obj, fake = b.objective, b.nets.fake_score
    opt = torch.optim.Adam(fake.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for step in range(6):  # stage 1: fake-score updates only
        phases = obj.phases(step)
        assert [p.networks for p in phases] == [("fake_score",)]
        opt.zero_grad()
        phases[0].loss(b.batch(64), None).loss.backward()
        opt.step()
    x = torch.randn(256, 2)
    t = torch.full((256,), 0.5)

    def target_x0():
        return obj.target()(x, t).x0.detach()

    teacher_x0 = b.nets.teacher(x, t).x0
    seen = []
    for step in range(6, 6 + 3 * 3):
        obj.phases(step)
        seen.append((obj.target_index(), target_x0()))
    assert len(obj.path) == 3 and [i for i, _ in seen][::3] == [2, 1, 0]
    assert (seen[0][1] - teacher_x0).abs().max() > 1e-3  # the start of stage 2 is not the teacher ...
    assert obj.target() is b.nets.teacher and torch.equal(seen[-1][1], teacher_x0)  # ... its end is
    fake_x0 = fake(x, t).x0.detach()  # ... and it is not the fake score (the path's end), which would pull nowhere
    assert (seen[0][1] - fake_x0).abs().max() > 1e-3
    obj.target_index = lambda: 3
    torch.testing.assert_close(obj.target()(x, t).x0.detach(), fake_x0)  # the path's end is the degraded score
    assert not torch.equal(seen[0][1], seen[3][1])  # each snapshot differs from the next
    restored = gmm_built("objective.name=disback", "objective.record_iterations=6", "objective.record_every=2",
                         "objective.backtrack_every=3").objective
    restored.load_state_dict(copy.deepcopy(obj.state_dict()))
    restored.phases(6)
    torch.testing.assert_close(restored.target()(x, t).x0.detach(), seen[0][1])


def test_vsd_gan_term_reaches_the_generator_and_trains_the_head_and_fake_score(gmm_built):
    b = gmm_built("objective.name=vsd", "objective.gan_weight=0.5")
    gen_phase, fake_phase = b.objective.phases(0)
    with_gan = _generator_grads(b, gen_phase.loss)
    b.objective.cfg.gan_weight = 0.0
    without = _generator_grads(b, gen_phase.loss)
    assert any(not torch.equal(a, c) for a, c in zip(with_gan, without))
    assert fake_phase.networks == ("fake_score", "discriminator")
    torch.manual_seed(0)
    out = fake_phase.loss(b.batch(32), None)
    out.loss.backward()
    assert "loss/discriminator" in out.logs
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.nets.discriminator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.nets.fake_score.parameters())
