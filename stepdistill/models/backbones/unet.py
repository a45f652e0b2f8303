"""diffusers UNet2DModel: pixel-space DDPM/EDM-style UNets, unconditional or class-conditional (the bundled
Fashion-MNIST teachers)."""
from __future__ import annotations

from torch import nn

from ...registry import register
from . import Backbone, Tap


def unet_bottleneck(net):
    """A diffusers UNet's mid block (None without one)."""
    return Tap(net.mid_block, net.config.block_out_channels[-1], "map") if net.mid_block is not None else None


def unet_levels(net):
    """Every down block of a diffusers UNet, then its mid block."""
    levels = [Tap(block, ch, "map") for block, ch in zip(net.down_blocks, net.config.block_out_channels)]
    return levels + ([unet_bottleneck(net)] if net.mid_block else [])


@register("backbone", "unet")
class UNetBackbone(Backbone):
    name = "UNet2DModel"

    @staticmethod
    def claims(net: nn.Module) -> bool:
        from diffusers import UNet2DModel

        return isinstance(net, UNet2DModel)

    def call(self, score, net, x, timestep, cond):
        return net(x, timestep, class_labels=cond if score.conditioning == "class" else None).sample

    def bottleneck(self, net):
        return unet_bottleneck(net)

    def levels(self, net):
        return unet_levels(net)

    def conditioning(self, net):
        return "class" if net.config.num_class_embeds else "none"
