"""Attention backends of diffusers networks: PyTorch SDPA (the default), xformers when it is installed and usable, or
the explicit matmul-softmax reference ("math").

- sdpa: diffusers' AttnProcessor2_0, i.e. `F.scaled_dot_product_attention`; PyTorch picks a flash / memory-efficient /
  math kernel per call (sCM's forward-mode JVP narrows that to the math kernel for its duration).
- xformers: `enable_xformers_memory_efficient_attention()`; needs the xformers package and a CUDA device. When either
  is missing the run warns, names the reason, and uses sdpa: a recipe written for a GPU machine still runs elsewhere.
- math: diffusers' AttnProcessor (baddbmm + softmax + bmm), no fused kernel: the slow, transparent reference.

Networks that are not diffusers models (the Gaussian-mixture teacher's MLPs) have no attention; the setting does not
apply to them and is reported as "n/a".
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import InputError

ATTENTION = ("sdpa", "xformers", "math")


def diffusers_models(module: nn.Module) -> list[nn.Module]:
    """The outermost diffusers models (ModelMixin) inside `module` (the module itself included)."""
    from diffusers import ModelMixin

    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        if isinstance(m, ModelMixin):
            found.append(m)
            return
        for child in m.children():
            visit(child)

    visit(module)
    return found


def xformers_status(device: torch.device | str | None = None) -> str | None:
    """None when xformers can run here, else the reason it cannot (a sentence)."""
    try:
        import xformers.ops
    except ImportError as e:
        return f"xformers is not installed ({e})"
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return f"xformers' memory-efficient attention needs a CUDA device, and this network is on {device}"
    if not torch.cuda.is_available():
        return "xformers' memory-efficient attention needs a CUDA device, and none is available"
    try:  # a build for another torch / CUDA imports fine and fails at its first call: try one, in both dtypes we use
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(1, 2, 1, 40, device=device or "cuda", dtype=dtype)  # [batch, tokens, heads, head dim]
            xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as e:  # noqa: BLE001 (any failure means: not usable here)
        return f"xformers is installed but cannot run here ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return None


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def set_attention(module: nn.Module, backend: str, role: str = "network") -> str:
    """Set the attention of every diffusers model inside `module`; returns the backend in use ("n/a" when `module`
    holds no diffusers model). An unusable xformers warns (naming the reason and the fallback) and uses sdpa; so do
    transformers with their own attention processors (SD3, FLUX, SANA), which keep them."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if backend not in ATTENTION:
        raise InputError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION)}")
    models = diffusers_models(module)
    if not models:
        return "n/a"
    if backend == "xformers":
        reason = xformers_status(_device(module))
        if reason is not None:
            warnings.warn(f"train.attention=xformers for the {role}: {reason}; falling back to sdpa (PyTorch "
                          "scaled_dot_product_attention). Install an xformers build matching your torch on a CUDA "
                          "machine, or set train.attention=sdpa to silence this.", stacklevel=2)
            backend = "sdpa"
    in_use = backend
    for m in models:
        if not getattr(m, "attn_processors", None):
            continue  # a diffusers model without attention layers (e.g. a UNet2DModel without attention blocks)
        if not _plain(m):  # SD3 / FLUX / SANA blocks keep their own processors, which call SDPA themselves
            in_use = "sdpa"
            if backend != "sdpa":  # diffusers' xformers switch would replace SANA's linear attention (and qk-norms)
                warnings.warn(f"train.attention={backend} for the {role}: {type(m).__name__} has its own attention "
                              "processors (joint / rotary / linear attention); keeping them (they use PyTorch's "
                              "scaled_dot_product_attention)", stacklevel=2)
        elif backend == "xformers":
            m.enable_xformers_memory_efficient_attention()
        else:
            m.set_attn_processor(AttnProcessor2_0() if backend == "sdpa" else AttnProcessor())
    return in_use


@contextmanager
def without_xformers(module: nn.Module) -> Iterator[None]:
    """SDPA in place of xformers' attention inside `module` for the duration: xformers' kernel has no forward-mode AD
    rule (facebookresearch/xformers#552), so sCM's JVP would otherwise fail and fall back to finite differences."""
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    swapped = [(m, m.processor) for m in module.modules()
               if isinstance(getattr(m, "processor", None), XFormersAttnProcessor)]
    for m, _ in swapped:
        m.set_processor(AttnProcessor2_0())
    try:
        yield
    finally:
        for m, processor in swapped:
            m.set_processor(processor)


def _plain(model: nn.Module) -> bool:
    """Whether every attention layer of `model` is diffusers' plain attention (UNets), whose processor can be swapped
    between math, SDPA and xformers; transformers such as SD3's, FLUX's and SANA's keep their own processors."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

    return all(isinstance(p, (AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor))
               for p in model.attn_processors.values())
