"""Discriminators built from score networks' own features, captured with forward hooks.

Two kinds. A head on the fake score's bottleneck (DMD2's `cls_pred_branch`, SiDA): the fake score runs as usual, the
output of its bottleneck (a UNet's mid block, a transformer's middle block, an MLP's last hidden layer) feeds a small
head, and the head's loss on real data trains the head and, through the features, the fake score's backbone. And
LADD's (Sauer et al. 2024, SANA-Sprint): heads on a *frozen* teacher's features at several depths (every down block
and the mid block of a UNet, four blocks of a transformer, every hidden layer of an MLP); only the heads train, and
the generator's gradient flows through the teacher. Which layers a family offers is its backbone adapter's answer
(models/backbones: `Tap`).
SiDA's option has no head at all: the channel mean of the fake score's bottleneck is the logit (`encoder_mean`).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..diffusion.parametrization import Prediction
from ..errors import InputError
from .backbones import Tap, backbone_of
from .score import ScoreModel, device_of


def feature_module(score: ScoreModel) -> Tap:
    """The fake score's bottleneck layer, for a network whose family exposes one."""
    found = backbone_of(score.net).bottleneck(score.net)
    if found is None:
        raise InputError(f"a discriminator needs the fake score's features, and a {type(score.net).__name__} does "
                         "not expose them: use a diffusers UNet (with a mid block), an SD3, FLUX or SANA transformer "
                         "or the MLP, or set the GAN weight to 0")
    return found


def feature_levels(score: ScoreModel) -> list[Tap]:
    """LADD's feature taps at several depths of a supported network."""
    found = backbone_of(score.net).levels(score.net)
    if found is None:
        raise InputError(f"LADD reads the teacher's features, and this toolkit cannot hook the layers of a "
                         f"{type(score.net).__name__} (it knows diffusers UNets, the SD3, FLUX and SANA transformers "
                         "and the MLP). Fallback: a discriminator head on the trainable fake score instead (objective "
                         "vsd with "
                         "objective.gan_weight > 0, DMD2's GAN), or objective scm with objective.adv_weight=0")
    return found


@contextmanager
def captured(*taps: Tap):
    """Collect each tapped layer's forward outputs (the tap's element of a tuple) while the block runs: one list per
    tap."""
    outputs: list[list[torch.Tensor]] = [[] for _ in taps]

    def hook(store, index):
        return lambda _m, _i, out: store.append(out[index] if isinstance(out, tuple) else out)

    handles = [tap.module.register_forward_hook(hook(store, tap.output)) for tap, store in zip(taps, outputs)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


class DiscriminatorHead(nn.Module):
    """Features -> one logit per sample.

    Maps: a stride-2 conv with GroupNorm and SiLU, a second conv, a global average and a 1x1 projection (DMD2's head
    is a stack of such stride-2 blocks down to 1x1; GroupNorm at 1x1 with narrow groups would erase the features, so
    only the first block is normalised). Tokens: StyleGAN-T's head as LADD and SANA-Sprint put it on transformer
    tokens: a pointwise conv, a residual conv over 9 neighbouring tokens, a pointwise projection to one logit per
    token, averaged over the tokens (as the map head averages its positions); GroupNorm where StyleGAN-T has a local
    batch norm (no running statistics to keep), and at most 768 channels inside (ViT-B's width, the size the head was
    designed at) so that a 3,072-wide FLUX block does not cost 85M parameters per head. Vectors: an MLP."""

    def __init__(self, channels: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "map":
            self.net = nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1),
                                     nn.GroupNorm(_groups(channels), channels), nn.SiLU(),
                                     nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, 1), nn.Flatten(0))
        elif kind == "tokens":
            width = min(channels, 768)
            self.net = nn.Sequential(nn.Conv1d(channels, width, 1), nn.GroupNorm(_groups(width), width), nn.SiLU())
            self.residual = nn.Sequential(nn.Conv1d(width, width, 9, padding=4), nn.GroupNorm(_groups(width), width),
                                          nn.SiLU())
            self.out = nn.Conv1d(width, 1, 1)
        else:
            self.net = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1), nn.Flatten(0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.kind != "tokens":
            return self.net(features.float())
        h = self.net(features.float().transpose(1, 2))  # (N, L, C) -> (N, C, L)
        return self.out(h + self.residual(h)).mean(dim=(1, 2))


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and channels // g >= min(4, channels))


def build_discriminator(fake: ScoreModel) -> DiscriminatorHead:
    tap = feature_module(fake)
    return DiscriminatorHead(tap.channels, tap.kind)


def encoder_mean(features: torch.Tensor, kind: str) -> torch.Tensor:
    """SiDA's parameter-free discriminator: the channel mean of the bottleneck features as a logit map: (N, H*W) for
    a feature map, (N, L) for tokens and (N, 1) for a vector (sida_networks.py: `x.mean(dim=1, keepdim=True)` of the
    encoder's output)."""
    return features.float().mean(dim=-1 if kind == "tokens" else 1).reshape(len(features), -1)


def discriminate(fake: ScoreModel, head: DiscriminatorHead | None, x_t: torch.Tensor, t: torch.Tensor,
                 cond: torch.Tensor | None) -> tuple[Prediction, torch.Tensor]:
    """One pass of the fake score: its prediction and the head's (N,) logits on its bottleneck features; with no
    head (None), SiDA's encoder_mean logits, so the fake score itself is the discriminator."""
    tap = feature_module(fake)
    with captured(tap) as (feats,):
        pred = fake(x_t, t, cond)
    return pred, (encoder_mean(feats[-1], tap.kind) if head is None else head(feats[-1]))


class TeacherFeatureDiscriminator(nn.Module):
    """LADD's discriminator: one head per feature level of a frozen backbone (the teacher). forward gives (N, levels)
    logits. The backbone is held outside the module tree, so it is neither trained nor saved with the heads."""

    def __init__(self, backbone: ScoreModel) -> None:
        super().__init__()
        levels = feature_levels(backbone)
        self._backbone, self._taps = [backbone], levels  # plain lists: not submodules
        self.heads = nn.ModuleList(DiscriminatorHead(tap.channels, tap.kind) for tap in levels)

    def to(self, *args, **kwargs) -> TeacherFeatureDiscriminator:
        """Moving the heads moves the backbone to their device too (not their dtype: that is the teacher's choice)."""
        super().to(*args, **kwargs)
        self._backbone[0].to(device_of(self.heads))
        return self

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        with captured(*self._taps) as feats:
            self._backbone[0](x_t, t, cond)
        return torch.stack([head(f[-1]) for head, f in zip(self.heads, feats)], dim=1)
