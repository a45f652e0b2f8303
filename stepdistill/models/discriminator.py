"""Discriminators built from score networks' own features, captured with forward hooks.

Two kinds. A head on the fake score's bottleneck (DMD2's `cls_pred_branch`, SiDA): the fake score runs as usual, the
output of its bottleneck (a UNet's mid block, an MLP's last hidden layer) feeds a small head, and the head's loss on
real data trains the head and, through the features, the fake score's backbone. And LADD's (Sauer et al. 2024,
SANA-Sprint): heads on a *frozen* teacher's features at several depths (every down block and the mid block of a
UNet, every hidden layer of an MLP); only the heads train, and the generator's gradient flows through the teacher.
SiDA's option has no head at all: the channel mean of the fake score's bottleneck is the logit (`encoder_mean`).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..diffusion.parametrization import Prediction
from ..errors import InputError
from .backbones import backbone_of
from .score import ScoreModel, device_of


def feature_module(score: ScoreModel) -> tuple[nn.Module, int, bool]:
    """(module whose output is the feature map, its channels, whether it is spatial) for a supported network."""
    found = backbone_of(score.net).bottleneck(score.net)
    if found is None:
        raise InputError(f"a discriminator needs the fake score's features, and a {type(score.net).__name__} does "
                         "not expose them: use a diffusers UNet (with a mid block) or the MLP, or set the GAN weight "
                         "to 0")
    return found


def feature_levels(score: ScoreModel) -> list[tuple[nn.Module, int, bool]]:
    """LADD's feature taps: (module, channels, spatial) at several depths of a supported network."""
    found = backbone_of(score.net).levels(score.net)
    if found is None:
        raise InputError(f"LADD reads the teacher's features, and this toolkit cannot hook the layers of a "
                         f"{type(score.net).__name__} (it knows diffusers UNets and the MLP). Fallback: a "
                         "discriminator head on the trainable fake score instead (objective vsd with "
                         "objective.gan_weight > 0, DMD2's GAN), or objective scm with objective.adv_weight=0")
    return found


@contextmanager
def captured(*modules: nn.Module):
    """Collect each module's forward outputs (the first element of a tuple, as UNet down blocks return) while the
    block runs: one list per module."""
    outputs: list[list[torch.Tensor]] = [[] for _ in modules]

    def hook(store):
        return lambda _m, _i, out: store.append(out[0] if isinstance(out, tuple) else out)

    handles = [m.register_forward_hook(hook(store)) for m, store in zip(modules, outputs)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


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


def encoder_mean(features: torch.Tensor) -> torch.Tensor:
    """SiDA's parameter-free discriminator: the channel mean of the bottleneck features as a logit map, (N, H*W) for
    a feature map and (N, 1) for a vector (sida_networks.py: `x.mean(dim=1, keepdim=True)` of the encoder's output)."""
    return features.float().mean(dim=1).reshape(len(features), -1)


def discriminate(fake: ScoreModel, head: DiscriminatorHead | None, x_t: torch.Tensor, t: torch.Tensor,
                 cond: torch.Tensor | None) -> tuple[Prediction, torch.Tensor]:
    """One pass of the fake score: its prediction and the head's (N,) logits on its bottleneck features; with no
    head (None), SiDA's encoder_mean logits, so the fake score itself is the discriminator."""
    module, _, _ = feature_module(fake)
    with captured(module) as (feats,):
        pred = fake(x_t, t, cond)
    return pred, (encoder_mean(feats[-1]) if head is None else head(feats[-1]))


class TeacherFeatureDiscriminator(nn.Module):
    """LADD's discriminator: one head per feature level of a frozen backbone (the teacher). forward gives (N, levels)
    logits. The backbone is held outside the module tree, so it is neither trained nor saved with the heads."""

    def __init__(self, backbone: ScoreModel) -> None:
        super().__init__()
        levels = feature_levels(backbone)
        self._backbone, self._taps = [backbone], [m for m, _, _ in levels]  # plain lists: not submodules
        self.heads = nn.ModuleList(DiscriminatorHead(ch, spatial) for _, ch, spatial in levels)

    def to(self, *args, **kwargs) -> TeacherFeatureDiscriminator:
        """Moving the heads moves the backbone to their device too (not their dtype: that is the teacher's choice)."""
        super().to(*args, **kwargs)
        self._backbone[0].to(device_of(self.heads))
        return self

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        with captured(*self._taps) as feats:
            self._backbone[0](x_t, t, cond)
        return torch.stack([head(f[-1]) for head, f in zip(self.heads, feats)], dim=1)
