"""SiDA's balance against mingyuanzhou/SiD (branch sida, sida_training/sida_loss.py and sida_training_loop.py).

The reference's generator step backpropagates 0.5 lsg sum_i L_i / B + 0.5 lsg_gan CHW BCE(D, 1) sum_i (1/wf_i) / B
(lsg = 100, lsg_gan = 0.01, BCE a mean over the batch and the logit map, logits clamped to [-10, 10]); dividing by
lsg leaves 0.5 L_SiD + 0.5 gan_scale numel g mean(1/wf) with gan_scale = 1e-4. Its discriminator loss is
lambda(sigma) (BCE(D(real), 1) + BCE(D(fake), 0)) / 2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2 summed over the
samples and divided by B, i.e. mean_i lambda_i times the batch-mean BCEs, sigma = exp(N(-1.2, 1.2)) and one noise
shared by the real and the fake image. The numbers below are worked out by hand from those equations.
"""
import math

import pytest
import torch

from stepdistill.models.discriminator import captured, discriminate, feature_module
from stepdistill.objectives import sid as sid_module
from stepdistill.objectives.sid import sida_generator_loss
from stepdistill.recipe import RecipeError, load_recipe

SIDA = ("objective.name=sid", "objective.adversarial=true")


def test_generator_loss_is_sidas_weighted_sum_by_hand():
    """Two samples of two elements, alpha 1.2: L_SiD per sample -0.6 / 0.5 and -2.2 / 1 (wf = mean|x_g - y_r|),
    so L_SiD = -1.7; the GAN term is gan_scale x numel (2) x mean softplus(-clamp(D, -10, 10)) x mean(1/wf) (1.5)."""
    x_g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y_r = torch.tensor([[0.5, 0.5], [1.0, 1.0]])
    y_f = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    logits = torch.tensor([[0.0, math.log(3)], [-math.log(3), 20.0]])  # a 2-position logit map per sample
    g = (math.log(32 / 3) + math.log1p(math.exp(-10))) / 4  # softplus(-0), (-ln 3), (ln 3), (-10: clamped) averaged
    for gan_scale in (1e-4, 0.5):
        loss, logs = sida_generator_loss(x_g, y_r, y_f, 1.2, logits, gan_scale)
        expected = 0.5 * -1.7 + 0.5 * gan_scale * 2 * g * 1.5
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        assert float(logs["loss/generator"]) == pytest.approx(-1.7, rel=1e-6)
    plain, logs = sida_generator_loss(x_g, y_r, y_f, 1.2, None, 1e-4)  # no logits: plain SiD
    assert plain.item() == pytest.approx(-1.7, rel=1e-6) and "loss/generator_adv" not in logs


def test_warmups_follow_the_reference_loop(gmm_built):
    """Before generator_warmup only the fake score (and its discriminator) trains; before gan_warmup the generator's
    loss is plain SiD; after it 0.5 L_SiD + 0.5 L_GAN."""
    b = gmm_built(*SIDA, "objective.generator_warmup=2", "objective.gan_warmup=4")
    obj = b.objective
    assert [p.networks for p in obj.phases(1)] == [("fake_score", "discriminator")]
    assert [p.networks for p in obj.phases(2)][-1] == ("generator",)
    torch.manual_seed(0)
    out = obj.phases(3)[-1].loss(b.batch(8), None)
    assert "loss/generator_adv" not in out.logs
    assert out.loss.item() == pytest.approx(float(out.logs["loss/generator"]), rel=1e-6)
    out = obj.phases(4)[-1].loss(b.batch(8), None)
    expected = 0.5 * float(out.logs["loss/generator"]) + 0.5 * float(out.logs["loss/generator_adv"])
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_reference_defaults_are_the_cifar10_run_in_iterations():
    """200k images (GAN term) and 100k images (generator frozen) at the reference's batch 256; 0.01 / 100; lsd 1."""
    cfg = sid_module.SiDConfig()
    assert (cfg.gan_warmup, cfg.generator_warmup) == (782, 391)  # first k with k * 256 > 200e3 and > 100e3
    assert cfg.gan_scale == pytest.approx(0.01 / 100)
    assert (cfg.d_p_mean, cfg.d_p_std, cfg.d_sigma_data, cfg.gan_d_weight) == (-1.2, 1.2, 0.5, 1.0)


def test_discriminator_loss_is_lambda_weighted_with_shared_noise_and_sigma(gmm_built, monkeypatch):
    """Real and fake are noised with one noise and one sigma per sample; with logits 0 each BCE is ln 2, so the loss
    is mean_i lambda(sigma_i) x (ln 2 + ln 2) / 2 with lambda = 1/sd^2 + alpha^2/sigma^2 of the time used."""
    b = gmm_built(*SIDA)
    calls = []

    def fake_discriminate(fake, head, x_t, t, cond):
        calls.append((x_t.detach().clone(), t.detach().clone()))
        return None, torch.zeros(len(x_t), requires_grad=True)

    monkeypatch.setattr(sid_module, "discriminate", fake_discriminate)
    torch.manual_seed(0)
    batch = b.batch(64)
    x_g = torch.randn(64, 2)
    out = b.objective.discriminator_loss(batch, x_g)
    (x_fake, t_fake), (x_real, t_real) = calls
    torch.testing.assert_close(t_fake, t_real)
    alpha, sigma = b.nets.fake_score.schedule.alpha_sigma(t_fake)
    # shared noise: x_t = alpha x0 + sigma eps with the same eps on both sides
    torch.testing.assert_close((x_fake - alpha[:, None] * x_g) / sigma[:, None],
                               (x_real - alpha[:, None] * batch.x0) / sigma[:, None], rtol=1e-4, atol=1e-4)
    lam = (4.0 + alpha ** 2 / sigma ** 2).mean()
    assert out.loss.item() == pytest.approx(lam.item() * math.log(2), rel=1e-5)


def test_discriminator_sigma_is_log_normal(gmm_built):
    """log(sigma/alpha) of the discriminator's times has the reference's mean -1.2 and std 1.2 (n = 4096)."""
    b = gmm_built(*SIDA)
    torch.manual_seed(0)
    t = b.objective.discriminator_times(4096, torch.device("cpu"))
    alpha, sigma = b.nets.fake_score.schedule.alpha_sigma(t)
    log_sigma = (sigma / alpha).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.06)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.06)


def test_encoder_mean_discriminator_has_no_head(gmm_built):
    """discriminator: encoder_mean builds no trainable head; the logit is the channel mean of the fake score's
    bottleneck features, and the discriminator loss trains the fake score."""
    b = gmm_built(*SIDA, "objective.discriminator=encoder_mean", "objective.generator_warmup=0")
    assert b.nets.discriminator is None and "discriminator" not in b.objective.trains
    fake = b.nets.fake_score
    x, t = torch.randn(5, 2), torch.full((5,), 0.5)
    with captured(feature_module(fake)) as (feats,):
        fake(x, t, None)
    _, logits = discriminate(fake, None, x, t, None)
    torch.testing.assert_close(logits, feats[-1].float().mean(dim=1).reshape(5, -1))
    assert [p.networks for p in b.objective.phases(0)][0] == ("fake_score",)
    torch.manual_seed(0)
    out = b.objective.phases(0)[0].loss(b.batch(16), None)
    assert "loss/discriminator" in out.logs
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())


@pytest.mark.parametrize("override", ["objective.gan_warmup=-1", "objective.generator_warmup=-3",
                                      "objective.d_sigma_data=0", "objective.d_p_std=-1"])
def test_bad_sida_values_name_the_key(gmm_built, override):
    key = override.split("=")[0]
    with pytest.raises((RecipeError, ValueError), match=rf"{key} must be"):
        gmm_built(*SIDA, override)


def test_unknown_discriminator_is_refused():
    with pytest.raises(RecipeError, match="objective.discriminator: 'mlp' is not allowed; choose one of 'head', "
                                          "'encoder_mean'"):
        load_recipe(None, ["objective.discriminator=mlp"], data={"teacher": {"name": "gmm"},
                                                               "objective": {"name": "sid"}})


def test_sida_with_encoder_mean_on_a_unet(tiny_unet_folder, tmp_path):
    """On a diffusers UNet the encoder_mean logit is a map (one logit per bottleneck position); the fake phase trains
    only the fake score, the generator phase (after both warm-ups) only the generator, through D's logits."""
    import numpy as np

    from stepdistill.training.trainer import build

    np.savez(tmp_path / "real.npz", x=np.random.default_rng(0).uniform(-1, 1, (40, 1, 8, 8)).astype(np.float32),
             labels=np.arange(40) % 3)
    b = build(load_recipe(None, ["teacher.name=diffusers", f"teacher.path={tiny_unet_folder}", *SIDA,
                                 "objective.discriminator=encoder_mean", "objective.gan_warmup=0",
                                 "objective.generator_warmup=0", f"data.path={tmp_path / 'real.npz'}"],
                          data={"teacher": {}, "objective": {}}))
    x = torch.randn(3, 1, 8, 8)
    _, logits = discriminate(b.nets.fake_score, None, x, torch.full((3,), 0.5), torch.tensor([0, 1, 2]))
    assert logits.shape[0] == 3 and logits.shape[1] > 1
    torch.manual_seed(0)
    batch = b.batch(4)
    for phase in b.objective.phases(0):
        out = phase.loss(batch, None)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        for role in ("generator", "fake_score"):
            net = getattr(b.nets, role)
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters()) == (
                role in phase.networks), (phase.networks, role)
            net.zero_grad(set_to_none=True)
    assert out.logs["loss/generator_adv"] > 0
