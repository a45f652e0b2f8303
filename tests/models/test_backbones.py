"""Backbone adapters: each network family is claimed by exactly one adapter, and a new family is one new file whose
adapter the ScoreModel, the discriminators and the guidance embedding all use with nothing else edited."""
import sys

import pytest
import torch
from diffusers import (
    FluxTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from torch import nn

from stepdistill import registry
from stepdistill.diffusion.schedules import RectifiedFlow
from stepdistill.errors import InputError, RecipeError
from stepdistill.models.backbones import Backbone, backbone_of
from stepdistill.models.discriminator import feature_levels, feature_module
from stepdistill.models.mlp import MLPDenoiser
from stepdistill.models.score import ScoreModel, embed_guidance

PLUGIN = '''
"""A throw-away family: a network that takes the noise level by keyword and has one named feature layer."""
import torch
from torch import nn

from stepdistill.models.backbones import Backbone, Tap
from stepdistill.registry import register


class KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(3, 16), nn.SiLU())
        self.out = nn.Linear(16, 2)

    def forward(self, x, *, noise_level):
        return self.out(self.hidden(torch.cat([x, noise_level[:, None]], dim=1)))


@register("backbone", "keyword-net")
class KeywordBackbone(Backbone):
    name = "KeywordNet"

    @staticmethod
    def claims(net):
        return isinstance(net, KeywordNet)

    def call(self, score, net, x, timestep, cond):
        return net(x, noise_level=timestep)

    def bottleneck(self, net):
        return Tap(net.hidden, 16, "vector")

    def levels(self, net):
        return [Tap(net.hidden, 16, "vector")]
'''


def test_every_built_in_family_has_exactly_one_adapter():
    nets = {
        "unet": UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                            block_out_channels=(8, 16), norm_num_groups=4,
                            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
        "unet-text": UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=12,
                                          attention_head_dim=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "UpBlock2D")),
        "sd3": SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                     pooled_projection_dim=8, out_channels=4),
        "flux": FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                       pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)),
        "sana": SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                       num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                       cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=1),
        "mlp": MLPDenoiser(dim=2),
    }
    for name, net in nets.items():
        claimed = [n for n in registry.names("backbone") if registry.get("backbone", n).claims(net)]
        assert claimed == [name]
        assert type(backbone_of(net)) is registry.get("backbone", name)
    assert type(backbone_of(nn.Linear(2, 2))) is Backbone  # unclaimed: the plain-network defaults


def test_a_backbone_in_one_new_file_drives_the_score_model_and_the_discriminators(tmp_path):
    (tmp_path / "keyword_net.py").write_text(PLUGIN)
    registry.load_file(str(tmp_path / "keyword_net.py"))
    adapter = registry.get("backbone", "keyword-net")
    torch.manual_seed(0)
    score = ScoreModel(sys.modules[adapter.__module__].KeywordNet(), RectifiedFlow(), "x0")
    assert type(backbone_of(score.net)) is adapter
    x_t, t = torch.randn(4, 2), torch.rand(4)
    with torch.no_grad():  # called through the adapter: the network takes its time only as a keyword
        torch.testing.assert_close(score(x_t, t).x0, score.net(x_t, noise_level=score.schedule.native(t).float()))
    assert feature_module(score).module is score.net.hidden
    assert [tap.module for tap in feature_levels(score)] == [score.net.hidden]

def test_a_family_without_features_or_guidance_says_so():
    score = ScoreModel(nn.Linear(2, 2), RectifiedFlow(), "flow", "text", null_cond=torch.zeros(1, 3, 2))
    with pytest.raises(InputError, match="Linear does not expose them"):
        feature_module(score)
    with pytest.raises(InputError, match="cannot hook the layers of a Linear"):
        feature_levels(score)
    with pytest.raises(RecipeError, match="Linear has no guidance-embedding option"):
        embed_guidance(score, 4.5)
