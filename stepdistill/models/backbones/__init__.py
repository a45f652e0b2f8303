"""Backbones: how the toolkit calls one family of denoising networks, and where it reads their features.

ScoreModel (models/score.py) turns any network into the canonical predict(x_t, t, cond); what differs between
families (how time, labels, text tokens, pooled embeddings and guidance reach the network, which blocks a
discriminator taps, how a guidance embedding is added, what a diffusers folder's network is conditioned on) lives
in one adapter per family, one file each in this package, registered as kind "backbone". A new family is one new
file here (or a recipe's `plugins:` file) with a `@register("backbone", name)` Backbone subclass; nothing else
branches on the network's class. A network no adapter claims is called as net(x, t) or net(x, t, cond) and has no
features (the base class).
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn

from ... import registry


class Tap(NamedTuple):
    """A layer whose output a discriminator reads: the module, its feature width, the feature's layout ("map":
    (N, C, H, W); "vector": (N, C); "tokens": (N, L, C), a transformer's image tokens) and, for a module returning a
    tuple, which element holds the features (a UNet down block: 0; SD3's and FLUX's joint blocks return (text, image)
    tokens: 1)."""

    module: nn.Module
    channels: int
    kind: Literal["map", "vector", "tokens"]
    output: int = 0


class Backbone:
    """The defaults: a plain network called as net(x, timestep[, cond]), no features to tap, no guidance embedding,
    not loadable from a diffusers folder. Subclasses override what their family has."""

    name = "a plain network"

    @staticmethod
    def claims(net: nn.Module) -> bool:
        """Whether this adapter is the one for `net` (an isinstance check, which sees through peft's LoRA layers)."""
        return False

    def call(self, score, net: nn.Module, x: torch.Tensor, timestep: torch.Tensor,
             cond: torch.Tensor | None) -> torch.Tensor:
        """The network's raw output for x (already in the network's dtype) at native `timestep`; `score` is the
        ScoreModel (its conditioning, time_ids and guidance_vector)."""
        return net(x, timestep) if score.conditioning == "none" else net(x, timestep, cond)

    def bottleneck(self, net: nn.Module) -> Tap | None:
        """The layer DMD2's and SiDA's discriminators read on the fake score (a UNet's mid block, a transformer's
        middle block). None: the family exposes none."""
        return None

    def levels(self, net: nn.Module) -> list[Tap] | None:
        """LADD's feature taps at several depths of the teacher. None: the family exposes none."""
        return None

    def add_guidance_embedding(self, net: nn.Module) -> bool:
        """Give the network a guidance-scale input that starts switched off (in place); False when the family has
        no such option or the network already has one."""
        return False

    def conditioning(self, net: nn.Module) -> str | None:
        """"none", "class" or "text" for a network loaded from a diffusers folder; None: not loadable so."""
        return None


_by_type: dict[type, Backbone] = {}


def backbone_of(net: nn.Module) -> Backbone:
    """The adapter for `net`: the registered one that claims it, else the plain-network defaults (cached by type)."""
    kind = type(net)
    if kind not in _by_type:
        claimed = [registry.get("backbone", n) for n in registry.names("backbone")]
        claimed = [cls for cls in claimed if cls.claims(net)]
        _by_type[kind] = claimed[0]() if claimed else Backbone()
    return _by_type[kind]


class TransformerBackbone(Backbone):
    """A diffusion transformer (SD3, FLUX, SANA): the discriminators read its image tokens after whole blocks; the
    bottleneck is the middle block, LADD's levels four evenly spaced blocks, the last included (LADD and SANA-Sprint
    read a few intermediate blocks of the teacher, not all of them)."""

    image_output = 0  # which element of a block's output tuple holds the image tokens

    def blocks(self, net: nn.Module) -> list[nn.Module]:
        return list(net.transformer_blocks)

    def _tap(self, net: nn.Module, block: nn.Module) -> Tap:
        return Tap(block, net.config.num_attention_heads * net.config.attention_head_dim, "tokens", self.image_output)

    def bottleneck(self, net):
        blocks = self.blocks(net)
        return self._tap(net, blocks[(len(blocks) - 1) // 2])

    def levels(self, net, count: int = 4):
        blocks = self.blocks(net)
        return [self._tap(net, blocks[i]) for i in sorted({round((k + 1) * len(blocks) / count) - 1
                                                           for k in range(count)} - {-1})]
