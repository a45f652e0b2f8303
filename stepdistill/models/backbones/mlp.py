"""The toolkit's own MLPDenoiser (models/mlp.py): vectors, the Gaussian-mixture teachers' students."""
from __future__ import annotations

from torch import nn

from ...registry import register
from ..mlp import MLPDenoiser
from . import Backbone, Tap


@register("backbone", "mlp")
class MLPBackbone(Backbone):
    name = "MLPDenoiser"

    @staticmethod
    def claims(net: nn.Module) -> bool:
        return isinstance(net, MLPDenoiser)

    def bottleneck(self, net):
        return Tap(net.net[-2], net.hidden, "vector")  # the activation before the output layer

    def levels(self, net):
        return [Tap(m, net.hidden, "vector") for m in net.net if isinstance(m, nn.SiLU)]
