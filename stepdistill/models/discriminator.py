"""A discriminator that is a small head on the fake score's own features (DMD2's `cls_pred_branch`, SiDA).

The fake score network is run as usual and the output of its bottleneck (a UNet's mid block, an MLP's last hidden
layer) is captured with a forward hook and fed to the head. The head's loss on real data trains the head and, through
the features, the fake score's backbone (DMD2 adds it to the fake score's denoising loss).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..diffusion.parametrization import Prediction
from .mlp import MLPDenoiser
from .score import ScoreModel


def feature_module(score: ScoreModel) -> tuple[nn.Module, int, bool]:
    """(module whose output is the feature map, its channels, whether it is spatial) for a supported network."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    net = score.net
    if isinstance(net, (UNet2DModel, UNet2DConditionModel)) and net.mid_block is not None:
        return net.mid_block, net.config.block_out_channels[-1], True
    if isinstance(net, MLPDenoiser):
        return net.net[-2], net.hidden, False  # the activation before the output layer
    raise ValueError(f"a discriminator needs the fake score's features, and a {type(net).__name__} does not expose "
                     "them: use a diffusers UNet (with a mid block) or the MLP, or set the GAN weight to 0")


@contextmanager
def captured(module: nn.Module):
    """Collect `module`'s forward outputs while the block runs."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


class DiscriminatorHead(nn.Module):
    """Features -> one logit per sample. Spatial features: a stride-2 conv with GroupNorm and SiLU, a second conv,
    a global average and a 1x1 projection (DMD2's head is a stack of such stride-2 blocks down to 1x1; GroupNorm at
    1x1 with narrow groups would erase the features, so only the first block is normalised). Vectors: an MLP."""

    def __init__(self, channels: int, spatial: bool) -> None:
        super().__init__()
        if spatial:
            groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and channels // g >= min(4, channels))
            self.net = nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1),
                                     nn.GroupNorm(groups, channels), nn.SiLU(),
                                     nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, 1), nn.Flatten(0))
        else:
            self.net = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1), nn.Flatten(0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float())


def build_discriminator(fake: ScoreModel) -> DiscriminatorHead:
    _, channels, spatial = feature_module(fake)
    return DiscriminatorHead(channels, spatial)


def discriminate(fake: ScoreModel, head: DiscriminatorHead, x_t: torch.Tensor, t: torch.Tensor,
                 cond: torch.Tensor | None) -> tuple[Prediction, torch.Tensor]:
    """One pass of the fake score: its prediction and the head's (N,) logits on its bottleneck features."""
    module, _, _ = feature_module(fake)
    with captured(module) as feats:
        pred = fake(x_t, t, cond)
    return pred, head(feats[-1])
