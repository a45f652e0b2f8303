"""ScoreModel over diffusers UNets: class labels, text embeddings, guidance, loading from a folder."""
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from stepdistill.diffusion.parametrization import to_prediction
from stepdistill.diffusion.schedules import VPDiscrete
from stepdistill.models.loading import load_diffusers_score
from stepdistill.models.score import ScoreModel


def _text_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=12,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def test_text_conditional_unet_is_wrapped_and_guided():
    sched = DDPMScheduler(beta_schedule="scaled_linear")  # SD-style eps prediction
    score = ScoreModel(_text_unet(), VPDiscrete.from_diffusers(sched), "eps", "text", null_cond=torch.zeros(1, 5, 12))
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.9])
    emb = torch.randn(2, 5, 12)
    with torch.no_grad():
        pred = score(x_t, t, emb)
        raw = score.net(x_t, score.schedule.native(t).float(), encoder_hidden_states=emb).sample
        alpha, sigma = score.schedule.alpha_sigma(t)
        torch.testing.assert_close(pred.x0, to_prediction("eps", raw, x_t, alpha, sigma).x0)
        torch.testing.assert_close(score.guided(x_t, t, emb, 1.0).x0, pred.x0)
        uncond = score(x_t, t, torch.zeros(2, 5, 12))
        guided = score.guided(x_t, t, emb, 3.0)
    torch.testing.assert_close(guided.x0, uncond.x0 + 3.0 * (pred.x0 - uncond.x0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(guided.eps, uncond.eps + 3.0 * (pred.eps - uncond.eps), atol=1e-5, rtol=1e-4)


def test_class_conditional_folder_loads_with_null_label(tiny_unet_folder):
    score = load_diffusers_score(str(tiny_unet_folder))
    assert score.conditioning == "class" and score.null_label == 3 and score.prediction == "v"
    labels = torch.tensor([0, 2])
    assert score.null(labels).tolist() == [3, 3]
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 1.0])
    with torch.no_grad():
        c, u = score(x_t, t, labels), score(x_t, t, score.null(labels))
        g = score.guided(x_t, t, labels, 2.0)
    torch.testing.assert_close(g.x0, u.x0 + 2.0 * (c.x0 - u.x0), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(c.x0, u.x0)


def test_missing_folder_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="looked in"):
        load_diffusers_score(str(tmp_path / "no_such_teacher"))
