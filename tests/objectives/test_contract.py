"""The contract every registered objective keeps, on the gmm teacher and on a tiny class-conditional UNet."""
import numpy as np
import pytest
import torch

from stepdistill.objectives.base import TRAINABLE
from stepdistill.recipe import RecipeError, load_recipe
from stepdistill.registry import get, names
from stepdistill.training.trainer import build


def _phases_run(b, steps, seed):
    """Run `steps` iterations' phases by hand; check where gradients land; return the losses."""
    torch.manual_seed(seed)
    losses = []
    for step in range(steps):
        batch = b.batch(16)
        samples = None
        for phase in b.objective.phases(step):
            out = phase.loss(batch, samples)
            samples = out.samples if out.samples is not None else samples
            assert torch.isfinite(out.loss), phase.network
            out.loss.backward()
            for role in TRAINABLE:
                net = getattr(b.nets, role)
                if net is None:
                    continue
                has_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
                assert has_grad == (role in phase.networks), (step, phase.network, role)
                net.zero_grad(set_to_none=True)
            assert all(p.grad is None for p in b.nets.teacher.parameters())
            assert set(phase.networks) <= set(b.objective.trains)
            losses.append(float(out.loss.detach()))
    return losses


@pytest.mark.parametrize("name", names("objective"))
def test_objective_contract_on_gmm(name, gmm_built):
    """Finite losses; each phase's gradients land only in the networks it trains (never the teacher); a K-step
    generator works; the same seed gives the same losses, another seed others."""
    def run(seed):
        torch.manual_seed(0)
        return _phases_run(gmm_built(f"objective.name={name}", "generator.steps=2",
                                        *get("objective", name).contract_overrides), 4, seed)

    assert run(0) == run(0)
    assert run(0) != run(1)


@pytest.mark.parametrize("name", names("objective"))
def test_objective_contract_on_a_class_conditional_unet(name, tiny_unet_folder, tmp_path):
    """The same on a diffusers UNet with class labels and CFG, real data given as data.path (labels included)."""
    x = np.random.default_rng(0).uniform(-1, 1, (40, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "real.npz", x=x, labels=np.arange(40) % 3)
    cls = get("objective", name)
    r = load_recipe(None, ["teacher.name=diffusers", f"teacher.path={tiny_unet_folder}", f"objective.name={name}",
                           f"data.path={tmp_path / 'real.npz'}", *cls.contract_overrides, *cls.guided_overrides],
                    data={"teacher": {}, "objective": {}})
    torch.manual_seed(0)
    _phases_run(build(r), 3, 0)


def test_objectives_that_need_real_data_say_what_to_add(tiny_unet_folder):
    with pytest.raises(RecipeError, match="data.path"):
        build(load_recipe(None, ["teacher.name=diffusers", f"teacher.path={tiny_unet_folder}", "objective.name=fdiv"],
                          data={"teacher": {}, "objective": {}}))


def test_bad_real_data_is_named(tiny_unet_folder, tmp_path):
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 3, 8, 8), np.float32), labels=np.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(3, 8, 8\).*\(1, 8, 8\)"):
        build(load_recipe(None, ["teacher.name=diffusers", f"teacher.path={tiny_unet_folder}", "objective.name=fdiv",
                                 f"data.path={tmp_path / 'wrong.npz'}"], data={"teacher": {}, "objective": {}}))


def test_unknown_divergence_and_guidance_mode_list_the_valid_ones(gmm_built):
    with pytest.raises(ValueError, match="js.*sh"):
        gmm_built("objective.name=fdiv", "objective.divergence=tv")
    with pytest.raises(RecipeError, match="zero_cfg"):
        gmm_built("objective.name=sid", "objective.guidance=cfg")


def test_few_step_generator_trains_every_step_by_backward_simulation(gmm_built):
    """Each generator update differentiates exactly one step k, drawn uniformly, after k gradient-free steps."""
    b = gmm_built("generator.steps=4")
    gen = b.nets.generator
    assert len(gen.times) == 4
    trained, original = [], gen.step

    def spy(x_t, k, cond=None, steps=None):
        if torch.is_grad_enabled():
            trained.append(k)
        return original(x_t, k, cond, steps)

    gen.step = spy
    torch.manual_seed(0)
    for _ in range(24):
        out = b.objective.generator_loss(b.batch(8))
        assert torch.isfinite(out.loss) and out.samples.shape == (8, 2)
    assert len(trained) == 24 and set(trained) == {0, 1, 2, 3}
