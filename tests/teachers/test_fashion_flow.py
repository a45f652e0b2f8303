"""The flow-matching Fashion-MNIST teacher: rectified flow with a smooth time embedding (the network sees t itself).

The first test trains a few steps with the project's script and reloads the folder; the second checks the bundled
checkpoint denoises held-out images far better than the best image-independent guess.
"""
from pathlib import Path

import pytest
import torch

from stepdistill.data import fashion
from stepdistill.models.loading import load_diffusers_score

try:
    fashion._root(None)
except FileNotFoundError:
    pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)", allow_module_level=True)

BUNDLED = Path(__file__).resolve().parents[2] / "checkpoints" / "fashion-flow"


def test_flow_training_writes_a_flow_folder_whose_time_input_is_t(tmp_path):
    from stepdistill.teachers.fashion_train import train_teacher

    train_teacher(str(tmp_path / "flow"), minutes=0.02, batch_size=8, param="flow", split="fit")
    score = load_diffusers_score(str(tmp_path / "flow"))
    assert score.prediction == "flow" and score.schedule.name == "flow" and score.conditioning == "class"
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(score.schedule.native(t), t)  # not 1000 t: the sinusoidal embedding turns slowly in t
    alpha, sigma = score.schedule.alpha_sigma(t)
    assert torch.allclose(alpha, 1 - t) and torch.allclose(sigma, t)


@pytest.mark.skipif(not BUNDLED.is_dir(), reason="checkpoints/fashion-flow is not bundled in this checkout")
def test_bundled_flow_teacher_denoises_held_out_images():
    score = load_diffusers_score(str(BUNDLED)).eval()
    x0, y = fashion.load("val")
    x0, y = x0[:256], y[:256]
    g = torch.Generator().manual_seed(0)
    for t_value in (0.3, 0.7):
        t = torch.full((len(x0),), t_value)
        x_t = score.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        with torch.no_grad():
            err = (score(x_t, t, y).x0 - x0).pow(2).mean()
        baseline = (x0 - x0.mean(0)).pow(2).mean()  # the mean image: the best guess that ignores x_t and the label
        assert err < 0.5 * baseline, (t_value, float(err), float(baseline))
