"""The VSD family against its references: f-distill's per-noise-level density ratio (NVlabs/FastGen f_distill.py),
DMD2's diffusion-GAN input (tianweiy/DMD2 sd_guidance.py), SwiftBrush's weighting (VinAIResearch/SwiftBrush
train_swiftbrush.py). Expected numbers are worked out by hand from the references' equations."""
from types import SimpleNamespace

import pytest
import torch

import stepdistill.objectives.terms as terms
import stepdistill.objectives.vsd as vsd_module
from stepdistill.objectives.base import Batch
from stepdistill.recipe import RecipeError, load_recipe


def _logits(r):
    return torch.tensor(r, dtype=torch.float32).log()


# ---- 1. f-distill: r divided by its mean within its time bin, h by its batch mean -------------------------------
def test_fdiv_ratio_that_depends_only_on_the_bin_gives_equal_weights(gmm_built):
    """The discriminator is calibrated differently per noise level (r ~ 0.1 at low noise, ~1 at high): dividing r by
    its bin mean removes that, so h(r) no longer acts as a time weighting. Without the bins JS's h would be
    0.09 at t = 0.05 and 0.5 at t = 0.95."""
    obj = gmm_built("objective.name=fdiv").objective
    assert obj.cfg.ratio_bins == 10 and obj.cfg.ratio_ema == 0.0  # FastGen's bin_num, ratio_ema_rate
    t = torch.tensor([0.05, 0.07, 0.45, 0.46, 0.95, 0.99, 1.0])  # t = 1 falls in the last bin
    r = [0.1, 0.1, 0.4, 0.4, 1.0, 1.0, 1.0]
    w = obj.weight(_logits(r), t)
    torch.testing.assert_close(w, torch.ones(7))
    off = gmm_built("objective.name=fdiv", "objective.ratio_bins=0").objective.weight(_logits(r), t)
    h = torch.tensor(r) / (1 + torch.tensor(r))
    torch.testing.assert_close(off, h / h.mean())  # the old behaviour, kept as ratio_bins: 0
    assert float(off[-1] / off[0]) == pytest.approx(0.5 / (0.1 / 1.1), rel=1e-5)  # 5.5x toward high noise


def test_fdiv_bin_normalisation_by_hand(gmm_built):
    """Two bins [0, .5), [.5, 1]; r = .5, 1 in the first (mean .75), 2 in the second: r' = 2/3, 4/3, 1;
    h_JS = r'/(1+r') = 2/5, 4/7, 1/2, batch mean 103/210, so w = 84/103, 120/103, 105/103."""
    obj = gmm_built("objective.name=fdiv", "objective.ratio_bins=2").objective
    w = obj.weight(_logits([0.5, 1.0, 2.0]), torch.tensor([0.1, 0.2, 0.7]))
    torch.testing.assert_close(w, torch.tensor([84.0, 120.0, 105.0]) / 103)


def test_fdiv_bin_means_ema_keeps_empty_bins_and_resumes_exactly(gmm_built):
    """ratio_ema = 0.5, three bins starting at 1 (FastGen's buffer). Call 1: bin 0 gets r = .5, 1 (mean .75) ->
    .875, bin 1 gets r = 2 -> 1.5, bin 2 is empty and stays 1. Call 2: bin 0 gets r = .25 -> .5625, bin 2 gets
    r = 3 -> 2, bin 1 is empty and stays 1.5; KL's h = r' = .25/.5625 = 4/9 and 3/2."""
    overrides = ("objective.name=fdiv", "objective.ratio_bins=3", "objective.ratio_ema=0.5", "objective.divergence=kl")
    obj = gmm_built(*overrides).objective
    obj.weight(_logits([0.5, 1.0, 2.0]), torch.tensor([0.1, 0.2, 0.5]))
    torch.testing.assert_close(obj.state_dict()["ratio_bins"], torch.tensor([0.875, 1.5, 1.0]))
    state = {k: v.clone() for k, v in obj.state_dict().items()}
    w = obj.weight(_logits([0.25, 3.0]), torch.tensor([0.3, 0.9]))
    torch.testing.assert_close(obj.state_dict()["ratio_bins"], torch.tensor([0.5625, 1.5, 2.0]))
    r = torch.tensor([4 / 9, 3 / 2])
    torch.testing.assert_close(w, r / r.mean())
    resumed = gmm_built(*overrides).objective
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.weight(_logits([0.25, 3.0]), torch.tensor([0.3, 0.9])), w)


def test_fdiv_generator_weight_reads_each_samples_time(gmm_built, monkeypatch):
    """The generator loss hands weight() the DM pass's own per-sample t (the bins need it)."""
    b = gmm_built("objective.name=fdiv")
    seen = {}

    def weight(logits, t):
        seen["t"], seen["n"] = t, len(logits)
        return None

    monkeypatch.setattr(b.objective, "weight", weight)
    b.objective.phases(0)
    b.objective.generator_loss(b.batch(32))
    assert seen["n"] == 32 and seen["t"].shape == (32,) and 0.02 <= float(seen["t"].min()) < float(seen["t"].max())


def test_fdiv_needs_a_generator_adversarial_weight():
    """FastGen asserts gan_loss_weight_gen > 0 for f-distill; its default is 1e-3."""
    from stepdistill.training.trainer import build

    def fdiv(*overrides):
        return build(load_recipe(None, ["teacher.hidden=64", *overrides],
                                 data={"teacher": {"name": "gmm"}, "objective": {"name": "fdiv"}}))

    assert fdiv().objective.cfg.gan_weight == 1e-3
    for key, bad, match in (("gan_weight", "0", r"objective\.gan_weight > 0"),
                            ("gan_weight", "-0.1", r"objective\.gan_weight > 0"),
                            ("ratio_bins", "-1", r"objective\.ratio_bins must be >= 0"),
                            ("ratio_ema", "1.0", r"objective\.ratio_ema must be in \[0, 1\)")):
        with pytest.raises((RecipeError, ValueError), match=match):
            fdiv(f"objective.{key}={bad}")


# ---- 2. DMD2's diffusion GAN: its own noise and time over the full range ---------------------------------------
def _record(monkeypatch, b):
    """Record (x_t, t) of every discriminator call (in `d`, wherever it is made) and of the teacher's calls."""
    seen = {"d": [], "teacher": []}

    def wrap(fn):
        def inner(score, head, x_t, t, cond):
            seen["d"].append((x_t.detach().clone(), t.detach().clone()))
            return fn(score, head, x_t, t, cond)
        return inner

    monkeypatch.setattr(vsd_module, "discriminate", wrap(vsd_module.discriminate))
    monkeypatch.setattr(terms, "discriminate", wrap(terms.discriminate))
    guided = b.nets.teacher.guided

    def teacher(x_t, t, cond, scale):
        seen["teacher"].append((x_t.detach().clone(), t.detach().clone()))
        return guided(x_t, t, cond, scale)

    monkeypatch.setattr(b.nets.teacher, "guided", teacher)
    return seen


def test_dmd2_gan_renoises_the_sample_with_its_own_noise_and_full_time_range(gmm_built, monkeypatch):
    b = gmm_built("objective.name=vsd", "objective.gan_weight=0.1")
    assert (b.objective.cfg.gan_t_min, b.objective.cfg.gan_t_max) == (0.0, 1.0)  # DMD2: U{0..999}
    seen = _record(monkeypatch, b)
    torch.manual_seed(0)
    gen, fake = b.objective.phases(0)
    batch = b.batch(512)
    out = gen.loss(batch, None)
    (x_dm, t_dm), = seen["teacher"]
    (x_gan, t_gan), = seen["d"]
    assert not torch.equal(t_gan, t_dm) and not torch.equal(x_gan, x_dm)
    assert float(t_gan.min()) < 0.02 and float(t_gan.max()) > 0.98  # beyond the DM range [0.02, 0.98]
    # the generator term sees x_gan = alpha x0 + sigma eps' of the same generator sample x0, with fresh noise eps'
    alpha, sigma = b.nets.teacher.schedule.alpha_sigma(t_gan)
    eps_gan = (x_gan - alpha[:, None] * out.samples) / sigma[:, None]
    alpha, sigma = b.nets.teacher.schedule.alpha_sigma(t_dm)
    eps_dm = (x_dm - alpha[:, None] * out.samples) / sigma[:, None]
    assert abs(float(torch.corrcoef(torch.stack([eps_gan.flatten(), eps_dm.flatten()]))[0, 1])) < 0.15
    seen["d"].clear()
    fake.loss(batch, out.samples)
    (_, t_fake), (_, t_real) = seen["d"]
    for t in (t_fake, t_real):
        assert float(t.min()) < 0.02 and float(t.max()) > 0.98


def test_dmd2_gan_time_range_is_a_recipe_key(gmm_built, monkeypatch):
    b = gmm_built("objective.name=vsd", "objective.gan_weight=0.1", "objective.gan_t_min=0.3",
                  "objective.gan_t_max=0.4")
    seen = _record(monkeypatch, b)
    gen, fake = b.objective.phases(0)
    batch = b.batch(256)
    out = gen.loss(batch, None)
    fake.loss(batch, out.samples)
    assert len(seen["d"]) == 3  # the generator's term, then D's fake and real
    for _, t in seen["d"]:
        assert 0.3 <= float(t.min()) and float(t.max()) <= 0.4
    with pytest.raises(ValueError, match=r"objective\.gan_t_min"):
        gmm_built("objective.name=vsd", "objective.gan_weight=0.1", "objective.gan_t_min=0.5",
                  "objective.gan_t_max=0.4")


def test_fdiv_reads_its_ratio_and_adversarial_term_at_the_dm_pass(gmm_built, monkeypatch):
    """FastGen's f-distill takes D's logits at the VSD term's x_t and t, for h(r) and for the generator's adversarial
    term alike, and trains D on times drawn like the generator's (sample_t_cfg): [t_min, t_max] here."""
    b = gmm_built("objective.name=fdiv")
    seen = _record(monkeypatch, b)
    gen, fake = b.objective.phases(0)
    batch = b.batch(512)
    out = gen.loss(batch, None)
    assert "loss/generator_adv" in out.logs
    (x_dm, t_dm), = seen["teacher"]
    (x_gan, t_gan), = seen["d"]
    assert torch.equal(x_gan, x_dm) and torch.equal(t_gan, t_dm)
    seen["d"].clear()
    fake.loss(batch, out.samples)
    assert len(seen["d"]) == 2
    for _, t in seen["d"]:
        assert 0.02 <= float(t.min()) and float(t.max()) <= 0.98


# ---- 3. SwiftBrush's weighting -------------------------------------------------------------------------------
def test_swiftbrush_generator_gradient_is_alpha_sigma_times_the_x0_difference(gmm_built, monkeypatch):
    """SwiftBrush: g = sigma^2 (eps_teacher - eps_fake); with eps = (x_t - alpha x0)/sigma this is
    alpha sigma (x0_fake - x0_real), no per-sample normaliser; L = 0.5 mean((x - sg(x - g))^2) so dL/dx = g / numel.
    Flow schedule at t = .25, .5: alpha sigma = .1875, .25."""
    b = gmm_built("objective.name=vsd", "objective.weighting=swiftbrush")
    obj = b.objective
    x0 = torch.tensor([[0.3, -0.2], [1.0, 2.0]], requires_grad=True)
    x0_real = torch.tensor([[0.0, 1.0], [-1.0, 0.5]])
    x0_fake = x0_real + torch.tensor([[1.0, -2.0], [4.0, 0.0]])
    monkeypatch.setattr(vsd_module, "sample_generator", lambda *a, **k: x0)
    monkeypatch.setattr(vsd_module, "uniform_t", lambda *a, **k: torch.tensor([0.25, 0.5]))
    monkeypatch.setattr(obj, "target", lambda: SimpleNamespace(guided=lambda *a: SimpleNamespace(x0=x0_real)))
    monkeypatch.setattr(b.nets.fake_score, "guided", lambda *a: SimpleNamespace(x0=x0_fake))
    obj.phases(0)
    out = obj.generator_loss(Batch(2))
    out.loss.backward()
    g = torch.tensor([[0.1875, -0.375], [1.0, 0.0]])
    torch.testing.assert_close(x0.grad, g / 4)
    assert float(out.loss.detach()) == pytest.approx(0.5 * (0.1875 ** 2 + 0.375 ** 2 + 1.0) / 4)
    # the DMD2 default on the same predictions: (x0_fake - x0_real) / mean|x0 - x0_real| per sample
    x0.grad = None
    obj.cfg.weighting = "dmd"
    obj.generator_loss(Batch(2)).loss.backward()
    norm = torch.tensor([[(0.3 + 1.2) / 2], [(2.0 + 1.5) / 2]])
    torch.testing.assert_close(x0.grad, (x0_fake - x0_real) / norm / 4)


def test_swiftbrush_fake_loss_is_the_alpha_weighted_eps_mse(gmm_built, monkeypatch):
    """SwiftBrush's LoRA loss mse(alpha eps_hat, alpha eps), t over the full range, equals the fake-score loss in x0
    space with weight alpha^4 / sigma^2."""
    b = gmm_built("objective.name=vsd", "objective.weighting=swiftbrush")
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    monkeypatch.setattr(terms, "uniform_t", lambda n, lo, hi, *a, **k: t)
    assert (b.objective.cfg.fake_t_min, b.objective.cfg.fake_t_max) == (0.0, 1.0)  # SwiftBrush: U{0..999}
    seen = {}
    fake = b.nets.fake_score
    guided = fake.guided

    def record(x_t, tt, cond, scale):
        pred = guided(x_t, tt, cond, scale)
        seen["x_t"], seen["x0_hat"] = x_t.detach(), pred.x0.detach()
        return pred

    monkeypatch.setattr(fake, "guided", record)
    x0 = torch.tensor([[0.5, -1.0], [2.0, 0.1], [-1.5, 1.5], [0.0, 0.7]])
    loss = b.objective.fake_loss(Batch(4), x0).loss
    alpha, sigma = (1 - t)[:, None], t[:, None]
    eps = (seen["x_t"] - alpha * x0) / sigma
    eps_hat = (seen["x_t"] - alpha * seen["x0_hat"]) / sigma
    assert float(loss) == pytest.approx(float(((alpha * eps_hat - alpha * eps) ** 2).mean()), rel=1e-5)
    monkeypatch.setattr(fake, "guided", guided)
    plain = gmm_built("objective.name=vsd").objective  # DMD2's default: (alpha^2 + sigma^2) / sigma^2
    plain.nets.fake_score.load_state_dict(fake.state_dict())
    torch.manual_seed(0)
    want = float((((1 - t) ** 2 + t ** 2)[:, None] / t[:, None] ** 2 *
                  (plain.nets.fake_score((1 - t)[:, None] * x0 + t[:, None] * torch.randn(4, 2), t, None).x0 - x0)
                  ** 2).mean())
    torch.manual_seed(0)
    assert float(plain.fake_loss(Batch(4), x0).loss) == pytest.approx(want, rel=1e-5)


def test_swiftbrush_guides_the_fake_score_as_the_teacher(gmm_built):
    """SwiftBrush applies the teacher's CFG scale to the LoRA fake score too (DMD2 keeps the fake unguided);
    SNOOPI's PG-SB is guidance_range with weighting swiftbrush."""
    sb = gmm_built("objective.name=vsd", "objective.weighting=swiftbrush", "objective.guidance_scale=4.5").objective
    sb.phases(0)
    assert sb.scales == (4.5, 4.5)
    dmd = gmm_built("objective.name=vsd", "objective.guidance_scale=4.5").objective
    dmd.phases(0)
    assert dmd.scales == (4.5, 1.0)
