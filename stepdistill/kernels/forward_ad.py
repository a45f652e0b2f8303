"""Forward-mode AD (torch.func.jvp) through diffusers networks: the workarounds sCM's exact JVP runs under
(objectives/scm.py, `objective.jvp`), and which `stepdistill bench --speed` replays its recorded JVP passes with."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention import without_xformers


@contextmanager
def forward_ad_ready(module: nn.Module, flash: bool = False):
    """Work around two gaps in PyTorch's forward-mode AD for the duration: fused attention kernels (SDPA's and
    xformers') have no JVP rule (use SDPA's math backend, as SANA-Sprint's `jvp=True` attention does; with `flash`,
    the SDPA calls the Triton kernel of kernels/jvp_attention.py can take go there instead), and group norm rejects a
    tangent whose strides differ from its input's (as after diffusers' attention reshapes), so its inputs are made
    contiguous first."""
    def contiguous(_, args):
        return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])

    hooks = [m.register_forward_pre_hook(contiguous) for m in module.modules() if isinstance(m, nn.GroupNorm)]
    try:
        with without_xformers(module), sdpa_kernel(SDPBackend.MATH), flash_jvp_attention(flash):
            yield
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def flash_jvp_attention(on: bool):
    """SDPA calls routed to the Triton JVP kernel for the duration when `on` (kernels/jvp_attention.py)."""
    if not on:
        yield
        return
    from .jvp_attention import sdpa_to_kernel

    with sdpa_to_kernel():
        yield
